"""IMP alternating gradient descent (projects/imp/train.py): compilations per signature,
masked updates, exact resume, summed baseline, bad configs."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import imp as imp_config
from core import partitioning
from projects.imp import losses as imp_losses
from projects.imp import train as imp_loop
from training import metrics, state as state_lib
from projects.imp.validate import validate


def small(data_dir, arg='tiny', **overrides):
  c = imp_config.get_config(arg)
  c.data.data_dir = data_dir
  c.model.num_layers, c.model.embed_dim, c.model.head_dim = 1, 32, 8
  c.model.mlp_dim, c.model.imp.proj_dim, c.model.imp.max_text_len = 64, 16, 48
  c.model.imp.moe.mlp_dim = 64
  for t in c.tasks.values():
    t.batch_size = 8
    if t.kind != 'classify':
      t.text_len = 48
  c.total_steps, c.warmup_steps, c.log_every, c.checkpoint_every = 40, 2, 1, 1000
  for key, value in overrides.items():
    node, *path = c, *key.split('.')
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
  return c


def test_one_compilation_per_signature_and_exact_resume(data_dir, tmp_path):
  """4 tasks, 2 of them classification at two resolutions: 4 signatures, 4 compilations
  however many steps; resumed from the checkpoint at step 7, steps 8-10 (schedule position
  and every task's data position restored) equal the straight run's."""
  config = small(data_dir, 'tiny,schedule=cycle', checkpoint_every=7)
  straight, resumed_dir = tmp_path / 'straight', tmp_path / 'resumed'
  imp_loop.train(config, str(straight), stop_at=10)
  rows = metrics.read_metrics(str(straight))
  assert [r['train/compilations'] for r in rows][-1] == 4
  assert [r['train/compilations'] for r in rows[:4]] == [1, 2, 3, 4]  # cycle: a, b, c, d
  shutil.copytree(straight / 'checkpoints' / '7', resumed_dir / 'checkpoints' / '7')
  imp_loop.train(config, str(resumed_dir), stop_at=10)
  resumed = {r['step']: r for r in metrics.read_metrics(str(resumed_dir))}
  assert sorted(resumed) == [8, 9, 10]
  for r in rows[7:]:
    for key, value in r.items():
      if key.endswith('/loss') or key == 'train/loss':
        assert resumed[r['step']][key] == pytest.approx(value, rel=1e-6), (r['step'], key)


def _one_step(config, kind_task):
  """The state before and after one AGD step on `kind_task`, on one device."""
  mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
  layout = state_lib.state_layout(config, mesh)
  state = state_lib.init_state(config, layout)
  before = jax.tree.map(np.asarray, state)
  tasks = imp_loop.task_specs(config)
  it = imp_loop.imp_tasks.make_task_iterator(kind_task, tasks[kind_task], config.data, seed=0)
  step = jax.jit(lambda s, b: imp_loop._step(  # pylint: disable=protected-access
      s, b, graphdef=layout.graphdef, tx=layout.tx, kinds={n: t.kind for n, t in tasks.items()},
      heads=imp_loop.task_heads(config), weights={n: 1.0 for n in tasks},
      mask=config.agd.mask_updates, seed=0, counter=[]))
  with jax.set_mesh(mesh):
    state, _ = step(state, {kind_task: next(it)})
    state, _ = step(state, {kind_task: next(it)})  # a 2nd step: moments and decay both act
  return before, jax.tree.map(np.asarray, state)


def _by_module(tree):
  """{module: [leaves]} of a params-shaped tree or an optimizer state holding such trees;
  each classifier head is its own module ('classifiers/<head>')."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, 'key', '')) for k in path]
    if 'classifiers' in names:
      module = 'classifiers/' + names[names.index('classifiers') + 1]
    else:
      module = next((n for n in names if n in sum(imp_losses.TASK_MODULES.values(), ())), None)
    if module:
      out.setdefault(module, []).append(leaf)
  return out


@pytest.mark.parametrize('mask', [True, False])
def test_a_step_changes_only_what_the_task_reaches_unless_asked(data_dir, mask):
  """classify32 on head 'shapes', classify16 on its own head 'small': a step on classify32
  leaves 'small' (and the text side) exactly as it was."""
  config = small(data_dir, f'tiny,mask={int(mask)}', **{'tasks.classify16.head': 'small'})
  config.model.imp.classifiers.small = 6
  before, after = _one_step(config, 'classify32')
  reached = set(imp_losses.task_modules('classify', 'shapes'))
  for part in ('params', 'opt_state'):
    old, new = _by_module(before[part]), _by_module(after[part])
    assert set(old) == {'image_embed', 'text_embed', 'encoder', 'classifiers/shapes',
                        'classifiers/small', 'image_proj', 'text_proj', 'log_temp',
                        'caption_head'}
    for module in old:
      same = all(np.array_equal(a, b) for a, b in zip(old[module], new[module]))
      if module in reached:
        assert not same, (part, module)
      elif mask or part == 'opt_state':  # zero grads leave Adam moments at 0
        assert same, (part, module)
      elif module != 'log_temp':  # unmasked: weight decay moves unreached matrices
        assert not same, (part, module)


def test_summed_baseline_takes_every_task_each_step(data_dir, tmp_path):
  config = small(data_dir, 'tiny,mode=summed')
  imp_loop.train(config, str(tmp_path), stop_at=2)
  rows = metrics.read_metrics(str(tmp_path))
  assert rows[-1]['train/compilations'] == 1
  for name in config.tasks:
    assert f'train/{name}/loss' in rows[0] and f'train/{name}/loss' in rows[1]


@pytest.mark.parametrize('overrides,words', [
    ({'agd.mode': 'both'}, "agd.mode='both'"),
    ({'agd.schedule': 'random'}, 'random'),
    ({'tasks.classify16.image_size': 18}, 'image_size=18 is not a multiple'),
    ({'tasks.caption.text_len': 80}, 'text_len=80 exceeds'),
    ({'tasks.contrastive.batch_size': 12}, 'batch_size=12 is not divisible by the 8'),
    ({'tasks.caption.kind': 'translate'}, "kind='translate'"),
    ({'tasks.classify32.weight': -1.0}, 'classify32'),
    ({'eval.zeroshot_prompts': ('a circle',)}, "one '{}' for the class name"),
    ({'tasks.classify16.head': 'imagenet'}, "head='imagenet': name one of the classifier"),
])
def test_bad_imp_configs(data_dir, overrides, words):
  with pytest.raises(ValueError) as err:
    validate(small(data_dir, **overrides), 8)
  assert words in str(err.value), str(err.value)


def test_a_dataset_with_more_classes_than_the_head_is_refused_before_compiling(data_dir,
                                                                                tmp_path):
  config = small(data_dir, **{'model.imp.classifiers.shapes': 4})
  with pytest.raises(ValueError, match=r"task 'classify16': dataset 'mm_shapes' has 6 "
                                       r'classes, more than its head '
                                       r'model.imp.classifiers.shapes=4'):
    imp_loop.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')
