"""How a run's first start builds its state: INITIALIZERS by name (training/stages.py
picks one per stage; `upcycle_from=DIR` picks 'upcycle'), each
`(config, layout, workdir) -> (state, data iterator state or None)`:

  fresh     a fresh init (training/state.py)
  main_run  the aux stage: the main run's latest params in WORKDIR, a fresh optimizer
  upcycle   DIR's latest checkpoint upcycled into the new model (MoMa: FFNs copied into
            experts; MoE: the dense FFN cut into fine-grained experts, models/upcycle.py)

  aux stage (MoMa, `stage='aux'`): the run lives in WORKDIR/aux/ and starts from the main
    model in WORKDIR/checkpoints/ (its latest step); the auxiliary routers train, the rest is
    frozen (training/state.py). The model settings must match the main run's.
  upcycling (`upcycle_from=DIR`, models/upcycle.py): the run starts from DIR's latest
    checkpoint with its FFNs copied into experts, a fresh optimizer and LR schedule (step 0)
    and DIR's data position. Only the first start does this: once the run has its own
    checkpoint it resumes from it and ignores `upcycle_from`. DIR, the model shapes and the
    data stream (seed, batch size, dataset) are checked before any array is read.

A source checkpoint is read with the source's own config (saved in its `meta` item), so its
optimizer state and model may differ from the new run's; only its params and data position
are used, laid out on the new run's mesh (dims the mesh cannot split, e.g. a 1t1i source's
2 experts on mesh.expert=8, are read replicated).
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models import families, upcycle as upcycle_lib
from training import checkpoint, state as state_lib, storage


def _fit_to_mesh(abstract, mesh):
  """Replicate the dims a source's layout cannot split on this mesh (e.g. the 2 experts of
  a 1t1i source when the new run has mesh.expert=8)."""
  def fit(a):
    spec = list(a.sharding.spec) + [None] * (a.ndim - len(a.sharding.spec))
    for d, axes in enumerate(spec):
      names = (axes,) if isinstance(axes, str) else (axes or ())
      size = 1
      for name in names:
        size *= mesh.shape[name]
      if a.shape[d] % size:
        spec[d] = None
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P(*spec)))
  return jax.tree.map(fit, abstract)


def read_source_config(src_workdir: str) -> tuple[ml_collections.ConfigDict, int]:
  """-> (the config of the latest checkpoint in `src_workdir`, its step); no arrays read."""
  if not storage.isdir(storage.join(src_workdir, 'checkpoints')):
    raise ValueError(f'no checkpoint in {storage.join(src_workdir, "checkpoints")} to start '
                     'from')
  ckpt = checkpoint.Checkpointer(src_workdir, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ValueError(f'no checkpoint in {ckpt.directory} to start from')
    return checkpoint.config_from_saved(ckpt.read_config(step)), int(step)
  finally:
    ckpt.close()


def restore_params(src_workdir: str, mesh):
  """-> (source config, params on `mesh`, data iterator state, step) of the latest
  checkpoint in `src_workdir`."""
  src_config, step = read_source_config(src_workdir)
  layout = state_lib.state_layout(src_config, mesh)
  ckpt = checkpoint.Checkpointer(src_workdir, create=False)
  try:
    state, data_state = ckpt.restore(step, _fit_to_mesh(layout.abstract, mesh))
  finally:
    ckpt.close()
  logging.info('read params of %s/%d (%s)', ckpt.directory, step, src_config.model.family)
  return src_config, state['params'], data_state, step


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


# What decides which batch comes next (data/pipeline.py: the state is a batch index into
# the stream of (seed, records, batch size)); the source's position means the same only
# if these match. seq_len and the encoding may differ.
DATA_STREAM_KEYS = ('seed', 'batch_size', 'data.tfds_name', 'data.train_split',
                    'data.num_workers')


def _dotted(config, key: str):
  node = config
  for part in key.split('.'):
    node = node.get(part) if hasattr(node, 'get') else None
  return node


def check_upcycle_source(src_dir: str) -> None:
  """`upcycle_from=DIR` must name a run directory holding a finished checkpoint
  (DIR/checkpoints/<step>/). Checked when an upcycled run starts (not by `validate`, so a
  run that already has its own checkpoints resumes even if DIR is gone)."""
  ckpt_dir = storage.join(src_dir, 'checkpoints')
  if not storage.isdir(src_dir):
    raise ValueError(f'config.upcycle_from={src_dir!r}: no such directory (give the workdir '
                     f'of a trained dense or 1t1i run)')
  steps = [d for d in storage.listdir(ckpt_dir) if d.isdigit()]
  if not steps:
    raise ValueError(f'config.upcycle_from={src_dir!r} has no checkpoint (expected '
                     f'{ckpt_dir}/<step>/ written by train.py)')


def upcycle_state(config, layout: state_lib.StateLayout):
  """The initial state of a run with `config.upcycle_from=DIR` (models/upcycle.py): DIR's
  latest params upcycled into the new model, step 0 and a fresh optimizer (so a fresh LR
  schedule). -> (state, DIR's data iterator state, DIR's step). Everything is checked
  (DIR, model shapes, data stream) before any array is read."""
  src_dir = config.upcycle_from
  check_upcycle_source(src_dir)
  src_config, src_step = read_source_config(src_dir)
  src_spec, new_spec = state_lib.model_spec(src_config), state_lib.model_spec(config)
  lib = families.get(new_spec.family).upcycler or upcycle_lib
  try:
    lib.check_compatible(src_spec, new_spec)
  except ValueError as e:
    raise ValueError(f'config.upcycle_from={src_dir!r}: {e}') from None
  diff = [f'{k}: {_dotted(src_config, k)!r} vs {_dotted(config, k)!r}'
          for k in DATA_STREAM_KEYS if _dotted(src_config, k) != _dotted(config, k)]
  if diff:
    raise ValueError(f'config.upcycle_from={src_dir!r}: the data position carries over '
                     f'only with the same data stream; differs: ' + '; '.join(diff))
  for warning in lib.start_warnings(new_spec):
    logging.warning('%s', warning)

  _, src_params, data_state, step = restore_params(src_dir, layout.mesh)

  def build(src):
    fresh = nnx.split(state_lib.make_model(config, config.seed))[1]
    params = lib.upcycle(src_spec, src, new_spec, fresh)
    return {'step': jax.numpy.zeros((), jax.numpy.int32), 'params': params,
            'opt_state': layout.tx.init(params)}

  with jax.set_mesh(layout.mesh):
    state = jax.jit(build, out_shardings=layout.shardings)(src_params)
  del src_params
  logging.info('upcycled %s step %d (%s, %s) into %s; fresh optimizer and LR schedule from '
               'step 0; data position %s', src_dir, step, src_config.model.family,
               lib.source_kind(src_spec), lib.describe_target(new_spec),
               data_state)
  return state, data_state, step


INITIALIZERS = {
    'fresh': lambda config, layout, workdir: (state_lib.init_state(config, layout), None),
    'main_run': lambda config, layout, workdir: (aux_stage_state(config, layout, workdir)[0],
                                                 None),
    'upcycle': lambda config, layout, workdir: upcycle_state(config, layout)[:2],
}
