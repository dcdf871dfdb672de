"""Orbax checkpoints in `WORKDIR/checkpoints/<step>/`, each holding:

  state/  the train state (params + optimizer state + step), sharded arrays
  data/   the Grain iterator state (JSON): where the input pipeline stands
  meta/   the config the run was started with (JSON), for humans and mismatch checks

Saves are asynchronous and committed atomically by Orbax: it writes into
`<step>.orbax-checkpoint-tmp-*` and renames when done, so a crash or kill -9 mid-save leaves
no half-written `<step>/`. A step directory that still lacks Orbax's metadata or one of the
items (copied by hand, a broken disk) is moved aside to `<step>.incomplete` when the run
starts, with a warning, and the newest complete step is the one resumed. Restoring takes
the abstract state of the *current* mesh, so a run saved on one mesh resumes on another.
Everything that cannot be read gives one `CheckpointError` naming the step directory and
the problem; nothing is ever deleted.
"""

from __future__ import annotations

import contextlib
import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from configs import common, mamba as mamba_configs, moe as moe_configs
from training import storage

ITEMS = ('state', 'data', 'meta')
DISK_FULL = ('No space left on device', 'RESOURCE_EXHAUSTED: Error writing', 'ENOSPC')
_ORBAX_METADATA = '_CHECKPOINT_METADATA'

# Config keys a resumed run may change: where and how it runs, not what it computes
# (`upcycle_from` is read only by a run's first start).
RESUMABLE_KEYS = ('mesh', 'log_every', 'checkpoint_every', 'max_checkpoints', 'eval',
                  'data.data_dir', 'data.num_workers', 'model.attention_impl', 'model.grouped_impl',
                  'model.remat', 'upcycle_from')


class CheckpointError(ValueError):
  """A checkpoint that cannot be used, named with the reason; it is left as it is."""


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def _if_saved_has(key: str, value):
  """A legacy default that applies only to configs holding `key` (to the others it returns
  None: they stay without the new key); `value` may be a function of the saved config."""
  return lambda saved: (None if key not in saved else value(saved) if callable(value)
                        else value)


# Keys added after checkpoints were written without them: what their absence meant (so a
# checkpoint of an older config resumes with the value that reproduces it).
LEGACY_DEFAULTS = {
    'trainer': lambda saved: 'imp' if saved.get('model.family') == 'imp' else 'decoder',
    'data.codebook': lambda saved: 'rgb64',
    'data.image_tokens_key': lambda saved: '',
    'data.image_vocab_size': lambda saved: 0,
    'model.grouped_impl': lambda saved: 'auto',
    'model.moe.num_experts_per_layer': _if_saved_has('model.moe.num_experts', ''),
    'model.moe.slices': _if_saved_has('model.moe.num_experts', 0),
    'model.attn_gate': lambda saved: 'none',
    **{k: _if_saved_has(moe_configs.PRESENCE_KEY, v) for k, v in
       moe_configs.LEGACY_DEFAULTS.items()},
    **{k: _if_saved_has(mamba_configs.PRESENCE_KEY, v) for k, v in
       mamba_configs.LEGACY_DEFAULTS.items()},
    **{f'eval.generation.{k}': (lambda v: lambda saved: v)(v)
       for k, v in common.generation_config().items()},
}


# Keys that only shape training (the schedule, the optimizer's constants, the train batch
# and stream): reading a trained run (eval) may take a config that differs in them, not in
# anything that changes the function the checkpoint computes.
TRAINING_ONLY_KEYS = ('total_steps', 'warmup_steps', 'learning_rate', 'end_lr_factor',
                      'weight_decay', 'adam_b1', 'adam_b2', 'adam_eps', 'grad_clip',
                      'batch_size', 'seed', 'data.train_split')


def config_changes(saved: dict, config, free_keys: tuple[str, ...] = RESUMABLE_KEYS
                   ) -> list[str]:
  """'key: saved -> now' for each key that differs, other than `free_keys` (and their
  sub-keys)."""
  a, b = _flatten(saved), _flatten(json.loads(config.to_json()))
  a.update({k: v for k, default in LEGACY_DEFAULTS.items()
            if k not in a and (v := default(a)) is not None})
  free = lambda k: any(k == r or k.startswith(r + '.') for r in free_keys)  # noqa: E731
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b)) if not free(k) and a.get(k) != b.get(k)]


def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
  """The locked ConfigDict of a config saved in a checkpoint's meta (JSON lists back to
  tuples), with LEGACY_DEFAULTS filled in for keys it predates."""
  flat = _flatten(saved)
  missing = {k: v for k, default in LEGACY_DEFAULTS.items()
             if k not in flat and (v := default(flat)) is not None}
  tuples = lambda v: (tuple(tuples(x) for x in v) if isinstance(v, list)  # noqa: E731
                      else {k: tuples(x) for k, x in v.items()} if isinstance(v, dict) else v)
  tree = tuples(saved)
  for key, value in missing.items():
    *parents, leaf = key.split('.')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  config = ml_collections.ConfigDict(tree)
  config.lock()
  return config


def _key_name(k) -> str:
  for attr in ('key', 'idx', 'name'):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _by_path(tree) -> dict:
  """{'params/blocks/0/attn/wq': leaf} for a state tree or Orbax's metadata of one (whose
  dicts spell nnx's `.value` and namedtuple fields as keys: the same names here)."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))[0]
  out = {}
  for path, leaf in leaves:
    name = '/'.join(_key_name(k) for k in path)
    out[name[:-len('/value')] if name.endswith('/value') else name] = leaf
  return out


def _incomplete(step_dir: str) -> list[str]:
  """What a committed step directory lacks (empty: complete)."""
  return [name for name in (_ORBAX_METADATA,) + ITEMS
          if not storage.exists(storage.join(step_dir, name))]


def _set_incomplete_aside(directory: str) -> None:
  """Process 0 renames step dirs that lack files to `<step>.incomplete[.n]`, warning."""
  if jax.process_index() != 0 or not storage.isdir(directory):
    return
  for name in storage.listdir(directory):
    path = storage.join(directory, name)
    if not (name.isdigit() and storage.isdir(path)):
      continue
    missing = _incomplete(path)
    if missing:
      aside, n = f'{path}.incomplete', 1
      while storage.exists(aside):
        aside, n = f'{path}.incomplete.{n}', n + 1
      storage.rename(path, aside)
      logging.warning('checkpoint %s lacks %s: not a complete checkpoint; moved to %s',
                      path, missing, aside)


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items above."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
               create: bool = True):
    """`create=False`: a reader (eval) that creates nothing; a missing directory has no
    steps."""
    self.directory = storage.join(storage.resolve(workdir), 'checkpoints')
    if not create and not storage.isdir(self.directory):
      raise FileNotFoundError(f'no checkpoint in {self.directory}: train first (python '
                              f'train.py --config=... --workdir={workdir})')
    _set_incomplete_aside(self.directory)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices('checkpoints scanned')
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config_json: str) -> None:
    """Start saving `step` (asynchronously). A disk that cannot hold another checkpoint the
    size of the newest one, or a failed earlier save, stops the run with a CheckpointError
    naming the directory; the newest complete checkpoint stays usable."""
    self._check_space()
    with self._disk_errors():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave({'config': json.loads(config_json)})), force=True)

  def _check_space(self) -> None:
    steps = self.all_steps()
    if not steps or jax.process_count() > 1:  # the save is collective: no one-sided refusal
      return
    free = storage.free_bytes(self.directory)  # None: an object store
    need = storage.tree_bytes(self.step_dir(max(steps)))
    if free is not None and free < need * 1.1:
      raise CheckpointError(
          f'no space left for the next checkpoint in {self.directory}: {free / 2**20:.1f} MiB '
          f'free, the newest checkpoint takes {need / 2**20:.1f} MiB. Free some space and run '
          f'again: it resumes from step {max(steps)}, the newest complete checkpoint.')

  @contextlib.contextmanager
  def _disk_errors(self):
    """Orbax's write errors for a full disk -> one CheckpointError naming the directory."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      text = f'{type(e).__name__}: {e}'
      if not any(s in text for s in DISK_FULL):
        raise
      try:  # let saves still in flight finish (or fail) before naming the newest
        self._manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        pass
      steps = [s for s in self.all_steps() if not _incomplete(self.step_dir(s))]
      newest = f'step {max(steps)}' if steps else 'none yet'
      raise CheckpointError(
          f'the disk is full: a checkpoint could not be written in {self.directory} (newest '
          f'complete checkpoint: {newest}; a partial one is left as *.orbax-checkpoint-tmp*, '
          'never read). Free some space and run again to resume.') from None

  def step_dir(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  def check_shapes(self, step: int, abstract_state) -> None:
    """CheckpointError naming the arrays whose saved shape or dtype differ from
    `abstract_state`'s (or that one side lacks), read from metadata only."""
    try:
      saved = self._manager.item_metadata(step)['state']
      saved = getattr(saved, 'tree', saved)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'cannot restore checkpoint {self.step_dir(step)}: its metadata '
                            f'is unreadable ({type(e).__name__}: {str(e)[:300]}). It is left '
                            'as it is: move it away to resume from an earlier step, or use '
                            'another --workdir.') from None
    have, want = _by_path(saved), _by_path(abstract_state)
    order = lambda k: (not k.startswith('params/'), k)  # noqa: E731  params first
    diffs = [f'{k}: saved {tuple(have[k].shape)} {have[k].dtype}, this config '
             f'{tuple(want[k].shape)} {want[k].dtype}'
             for k in sorted(set(have) & set(want), key=order)
             if tuple(have[k].shape) != tuple(want[k].shape) or have[k].dtype != want[k].dtype]
    diffs += [f'{k}: only in the checkpoint' for k in sorted(set(have) - set(want), key=order)]
    diffs += [f'{k}: not in the checkpoint' for k in sorted(set(want) - set(have), key=order)]
    if diffs:
      more = f' (and {len(diffs) - 6} more)' if len(diffs) > 6 else ''
      raise CheckpointError(f'checkpoint {self.step_dir(step)} does not fit this config\'s '
                            f'model: ' + '; '.join(diffs[:6]) + more)

  def restore(self, step: int, abstract_state):
    """-> (state laid out as `abstract_state`'s shardings, data iterator state)."""
    self.check_shapes(step, abstract_state)
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'cannot restore checkpoint {self.step_dir(step)} ({type(e).__name__}: '
          f'{str(e)[:300]}). It is left as it is: move it away to resume from an earlier '
          f'step (steps here: {self.all_steps()}), or use another --workdir.') from None
    return out['state'], out['data']

  def read_config(self, step: int) -> dict:
    """The config (as a dict) the run that wrote `step` was started with."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return out['meta']['config']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'cannot read the config saved in {self.step_dir(step)}/meta '
                            f'({type(e).__name__}: {str(e)[:200]})') from None

  def wait(self) -> None:
    with self._disk_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      with self._disk_errors():
        self._manager.wait_until_finished()
    finally:
      self._manager.close()
