"""The train-state tree every config builds (parameter and optimizer-state paths, shapes,
dtypes) is the one recorded in tests/checkpoint_trees.json, so checkpoints written by
earlier code keep restoring. Recorded before the architecture redesign (issue 15); a change
that moves or renames a parameter fails here. Re-record only for a deliberate, documented
format change:

  python tests/test_checkpoint_trees.py     # rewrites tests/checkpoint_trees.json
"""

import importlib
import json
import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=wrong-import-position
import trainers  # noqa: E402,F401  (registers every trainer's model, as train.py does)
from core import partitioning  # noqa: E402
from training import checkpoint, state as state_lib  # noqa: E402
PATH = os.path.join(ROOT, 'tests', 'checkpoint_trees.json')
CONFIGS = ('dense:tiny', 'moe:tiny', 'moe:tiny,router=expert_choice,every=1', 'moma:tiny',
           'moma:tiny,stage=aux', 'moma:tiny,groups=1t1i', 'moma:tiny,mod=1',
           'moma:tiny,shared=2', 'mot:tiny', 'mot:tiny,untie=ffn', 'mot:tiny,moe=text',
           'imp:tiny', 'imp:tiny,moe=2')


def state_tree(arg: str) -> dict[str, str]:
  """{'params/blocks/0/attn/wq': 'float32[128,4,32]', ...} of config `arg` on one device."""
  family, _, variant = arg.partition(':')
  config = importlib.import_module(f'configs.{family}').get_config(variant)
  mesh = partitioning.make_mesh(config.mesh, devices=jax.devices()[:1])
  layout = state_lib.state_layout(config, mesh)
  return {path: f'{leaf.dtype}{list(leaf.shape)}'.replace(' ', '')
          for path, leaf in sorted(checkpoint._by_path(layout.abstract).items())}


@pytest.fixture(scope='module')
def recorded():
  with open(PATH) as f:
    return json.load(f)


@pytest.mark.parametrize('arg', CONFIGS)
def test_state_tree_is_the_recorded_one(arg, recorded):
  want, got = recorded[arg], state_tree(arg)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  assert not missing and not extra, f'{arg}: missing {missing[:5]}, extra {extra[:5]}'
  changed = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
  assert not changed, f'{arg}: {dict(list(changed.items())[:5])}'


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  trees = {arg: state_tree(arg) for arg in CONFIGS}
  with open(PATH, 'w') as f:
    json.dump(trees, f, indent=0, sort_keys=False)
    f.write('\n')
  print(f'wrote {PATH}: {sum(map(len, trees.values()))} entries')
