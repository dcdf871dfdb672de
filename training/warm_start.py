"""Starting a run from another run's checkpoint instead of a fresh init.

  aux stage (MoMa, `stage='aux'`): the run lives in WORKDIR/aux/ and starts from the main
    model in WORKDIR/checkpoints/ (its latest step); the auxiliary routers train, the rest is
    frozen (training/state.py). The model settings must match the main run's.
  upcycling (`upcycle_from=DIR`, models/upcycle.py): the run starts from DIR's latest
    checkpoint with its FFNs copied into experts, a fresh optimizer and LR schedule (step 0)
    and DIR's data position.

A source checkpoint is read with the source's own config (saved in its `meta` item), so its
optimizer state and model may differ from the new run's; only its params and data position
are used, laid out on the new run's mesh.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from training import checkpoint, state as state_lib

AUX_DIR = 'aux'


def run_dir(config, workdir: str) -> str:
  """Where a run keeps its checkpoints and metrics: WORKDIR, or WORKDIR/aux for stage aux."""
  return os.path.join(workdir, AUX_DIR) if config.get('stage', 'main') == 'aux' else workdir


def restore_params(src_workdir: str, mesh):
  """-> (source config, params on `mesh`, data iterator state, step) of the latest
  checkpoint in `src_workdir`."""
  ckpt = checkpoint.Checkpointer(src_workdir)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f'no checkpoint in {ckpt.directory} to start from')
    src_config = ml_collections.ConfigDict(ckpt.read_config(step))
    layout = state_lib.state_layout(src_config, mesh)
    state, data_state = ckpt.restore(step, layout.abstract)
  finally:
    ckpt.close()
  logging.info('read params of %s/%d (%s)', ckpt.directory, step, src_config.model.family)
  return src_config, state['params'], data_state, int(step)


def model_mismatch(a: dict, b: dict, prefix: str = 'model') -> list[str]:
  """Dotted keys whose values differ between two (nested) model config dicts."""
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += model_mismatch(va, vb, f'{prefix}.{key}')
    elif va != vb:
      out.append(f'{prefix}.{key}: {va!r} vs {vb!r}')
  return out


def state_from_params(layout: state_lib.StateLayout, params):
  """A step-0 train state around `params` (fresh optimizer state), in the layout's shardings."""
  def build(p):
    return {'step': jax.numpy.zeros((), jax.numpy.int32), 'params': p,
            'opt_state': layout.tx.init(p)}
  with jax.set_mesh(layout.mesh):
    return jax.jit(build, out_shardings=layout.shardings)(params)


def aux_stage_state(config, layout: state_lib.StateLayout, main_workdir: str):
  """The aux stage's initial state: the main run's latest params, fresh optimizer."""
  src_config, params, _, step = restore_params(main_workdir, layout.mesh)
  diff = model_mismatch(src_config.model.to_dict(), config.model.to_dict())
  if diff:
    raise ValueError(f'stage aux: the main run in {main_workdir} has another model: '
                     + '; '.join(diff[:5]))
  logging.info('stage aux: training the auxiliary routers of %s step %d', main_workdir, step)
  return state_from_params(layout, params), step
