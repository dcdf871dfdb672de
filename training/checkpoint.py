"""Orbax checkpoints in `WORKDIR/checkpoints/<step>/`, each holding:

  state/  the train state (params + optimizer state + step), sharded arrays
  data/   the Grain iterator state (JSON): where the input pipeline stands
  meta/   the config the run was started with (JSON), for humans and mismatch checks

Saves are asynchronous and committed atomically by Orbax (a step directory appears only
once complete), so `latest_step()` always names a usable checkpoint. Restoring takes the
abstract state of the *current* mesh, so a run saved on one mesh resumes on another.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items above."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=('state', 'data', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config_json: str) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({'config': json.loads(config_json)})), force=True)

  def restore(self, step: int, abstract_state):
    """-> (state laid out as `abstract_state`'s shardings, data iterator state)."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore()))
    return out['state'], out['data']

  def read_config(self, step: int) -> dict:
    """The config (as a dict) the run that wrote `step` was started with."""
    out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return out['meta']['config']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
