"""The decoder trainer: config + workdir -> trained, checkpointed model and metrics.

    validate (shared, family, stage) -> Run (mesh, state layout, checkpointer, writer:
    training/run.py) -> resume the newest checkpoint in WORKDIR, or the stage's initialiser
    (training/stages.py, training/warm_start.py) -> log the per-layer table (params, active
    params, FLOPs per token: training/flops.py) -> AOT-compile the step -> run_steps:
    batch -> step -> (log | check | save)

Nothing here depends on the model family (models/families.py) or the stage: the stage's
table entry says what to train, from what, with which loss and in which directory.
"""

from __future__ import annotations

import functools

import jax

from core import partitioning
from data import pipeline, tokenizer
from training import flops, metrics, stages, state as state_lib, step as step_lib
from training import warm_start
from training.run import NonFiniteLossError, Run, run_steps  # noqa: F401  (the trainer's errors)
from training.validate import validate


def train(config, workdir: str, *, stop_at: int | None = None,
          allow_config_change: bool = False) -> dict:
  """Train `config` in `workdir`, resuming from its latest checkpoint.

  `stop_at` ends this run early at that step (checkpointing it) without changing the
  schedule, e.g. to test resumption. A workdir whose checkpoint was written with another
  config (other than `checkpoint.RESUMABLE_KEYS`, e.g. the mesh) is refused unless
  `allow_config_change`. Returns the last logged scalars.
  """
  validate(config, jax.device_count())
  pipeline.check_seq_len(config.data, config.seq_len)
  stage = stages.stage_of(config)
  main_workdir, workdir = workdir, stages.run_dir(config, workdir)
  with Run(config, workdir, allow_config_change=allow_config_change) as run:
    layout = run.layout
    data_iter = pipeline.make_train_iterator(
        config.data, seq_len=config.seq_len, global_batch_size=config.batch_size,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count())
    init = warm_start.INITIALIZERS[stages.initializer(config)]
    state, data_state, start = run.restore_or_init(
        lambda: init(config, layout, main_workdir), set_data_state=data_iter.set_state)

    names = tokenizer.MODALITIES
    step_fn = functools.partial(step_lib.train_step, graphdef=layout.graphdef, tx=layout.tx,
                                num_modalities=len(names), seed=config.seed,
                                stage=stage.name)
    batch_sh = partitioning.batch_sharding(run.mesh)
    jitted = jax.jit(step_fn, in_shardings=(layout.shardings, batch_sh),
                     out_shardings=(layout.shardings, None), donate_argnums=0)
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    schedule = state_lib.lr_schedule(config)  # for logging; the optimizer holds its own
    spec = state_lib.model_spec(config)
    if run.is_chief:
      flops.log_layer_table(spec, config.seq_len)  # per layer: params, active, FLOPs/token
    rates = metrics.Throughput(
        config.total_steps, tokens_per_step=config.batch_size * config.seq_len,
        flops_per_step=flops.train_flops_per_step(spec, config.seq_len, config.batch_size))
    compiled = None

    def take_step(step: int) -> dict:
      nonlocal state, compiled
      batch = partitioning.shard_batch(next(data_iter), batch_sh)
      if compiled is None:
        compiled = run.compile(jitted, state, batch)
      state, step_metrics = compiled(state, batch)
      if step == start:
        rates.start(step + 1)  # the first step's time includes dispatch warm-up
      return step_metrics

    def on_log(step: int, rows: list[dict]) -> dict:
      scalars = metrics.summarise(rows, names)
      scalars['train/lr'] = float(schedule(step - 1))
      if step > start + 1:
        scalars.update(rates.measure(step))
      run.writer.write(step, scalars)
      if run.is_chief:
        metrics.log_console(metrics.console_line(step, config.total_steps, scalars, names))
      return scalars

    def save(at: int) -> None:
      run.ckpt.save(at, state, data_iter.get_state(), config.to_json())

    return run_steps(config, run.mesh, start, end, take_step=take_step, on_log=on_log,
                     save=save)
