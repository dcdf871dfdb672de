"""Which parameters get weight decay (training/state.py `decay_mask`): weight matrices, never
norm scales (also a modality-untied [M, D] scale), biases, Mamba's A_log and dt bias, or the
dense-to-sparse gates' bias and log-temperature."""

import jax
import pytest
from flax import nnx

from configs import dense, mamba, moe, mot
from tests.helpers import tiny_config
from training import state as state_lib

CONFIGS = {
    'dense': lambda: dense.get_config('tiny'),
    'mot_untied': lambda: mot.get_config('tiny,untie=all,qk_norm=1'),
    'mamba_untied': lambda: mamba.get_config('tiny,untie=all'),
    'moe_gate': lambda: moe.get_config('tiny,router=activation_gate'),
}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_decay_mask(name):
  config = tiny_config(CONFIGS[name]())
  params = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: state_lib.make_model(config, 0)), nnx.Param))
  mask = state_lib.decay_mask(params)
  flat = {state_lib.param_path(path): (leaf, decays) for (path, leaf), decays in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask))}
  never = ('scale', 'A_log', 'dt_b', 'router_bias', 'log_temperature')
  seen = set()
  for path, (leaf, decays) in flat.items():
    last = path.split('/')[-1]
    if last in never:
      seen.add(last)
      assert not decays, path
    else:
      assert decays == (leaf.ndim >= 2), (path, leaf.shape)
  assert 'scale' in seen
  if name == 'mot_untied':  # the untied norms are [M, D] (and [M, K] for QK-norm)
    assert any(leaf.ndim == 2 and p.endswith('scale') for p, (leaf, _) in flat.items())
