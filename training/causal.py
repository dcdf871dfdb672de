"""The auxiliary routers' run, for everything that routes causally (eval's causal pass,
generation): the aux stage's params (WORKDIR/aux) when they hold the main checkpoint's
model exactly, else why not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from training import checkpoint, stages, state as state_lib, storage, warm_start


def has_aux_routers(params) -> bool:
  """Whether the model has parameters only the aux stage trains (MoMa's aux routers)."""
  aux = stages.STAGES['aux']
  return any(aux.trains(state_lib.param_path(path))
             for path, _ in jax.tree_util.tree_leaves_with_path(params))


def _main_weights(params) -> dict[str, jax.Array]:
  """Every parameter the main stage trains (not the auxiliary routers), by path."""
  main = stages.STAGES['main']
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if main.trains(state_lib.param_path(path))}


def stale_reason(main_params, aux_params, mesh) -> str | None:
  """Why the aux run's copy of the main model is not the main checkpoint's (None: same).
  The aux stage freezes the main model exactly, so equal means bit-identical."""
  a, b = _main_weights(main_params), _main_weights(aux_params)
  if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
    return 'the aux run has another model structure than the main checkpoint'
  keys = sorted(a)
  equal = jax.jit(lambda xs, ys: jnp.all(jnp.stack(
      [jnp.array_equal(x, y) for x, y in zip(xs, ys)])))
  with jax.set_mesh(mesh):
    same = bool(equal([a[k] for k in keys], [b[k] for k in keys]))
  return None if same else ('the main model in the aux run differs from the main checkpoint '
                            '(the main run trained on after the aux stage started)')


def load_aux_params(workdir: str, main_params, main_step: int, mesh):
  """-> (aux params or None, aux step or None, note or None) for the causal pass."""
  aux_dir = storage.join(workdir, stages.STAGES['aux'].subdir)
  if not storage.isdir(storage.join(aux_dir, 'checkpoints')):  # don't create it
    logging.info('no aux run in %s: no causal evaluation (train it with stage=aux)', aux_dir)
    return None, None, None
  try:
    _, params, _, aux_step = warm_start.restore_params(aux_dir, mesh)
  except checkpoint.CheckpointError:  # one that cannot be read: say so, don't skip quietly
    raise
  except ValueError as e:  # the directory exists but holds no checkpoint yet
    logging.info('%s: no causal evaluation', e)
    return None, None, None
  reason = stale_reason(main_params, params, mesh)
  if reason:
    note = (f'causal_loss skipped: {reason}; main step {main_step}, aux step {aux_step}. '
            f'Retrain the aux stage from this checkpoint (remove {aux_dir}, then '
            f'train.py --config=...,stage=aux).')
    logging.warning('%s', note)
    return None, aux_step, note
  logging.info('causal evaluation with the aux routers of %s/%d', aux_dir, aux_step)
  return params, aux_step, None
