"""Evaluation of the latest checkpoint in a workdir -> `WORKDIR/eval.json` + plots.

eval.json:
  {"step": N,
   "modalities": {"text": {"loss", "unigram_loss", "accuracy", "tokens"}, "image": {...}},
   "routing": {"layers": [{"layer": i, "expert_load": [E], "dropped_fraction", ...}]}}
  (`routing` only for models with MoE layers: the router metrics averaged over the eval
  batches; `expert_load[j]` = share of the layer's token-expert pairs routed to expert j)

`loss` is the mean next-token cross-entropy (nats) over that modality's target tokens of
the eval split; `unigram_loss` is the entropy of those same target tokens under their own
unigram distribution on the eval split: the loss of the best context-free predictor, so a
model below it has learnt to use context. `accuracy` is top-1 next-token accuracy.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from absl import logging

from data import pipeline, tokenizer
from training import checkpoint, plots, sharding, state as state_lib, step as step_lib
from training.validate import validate


def unigram_entropy(counts: np.ndarray) -> float:
  """Entropy (nats) of the empirical distribution given by token counts."""
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def routing_report(aux: dict[str, np.ndarray]) -> dict:
  """{'layer_1/expert_load': [E], ...} -> {'layers': [{'layer': 1, 'expert_load': [...],
  'dropped_fraction': ..., ...}]}, one entry per MoE layer, in layer order."""
  layers: dict[int, dict] = {}
  for key, value in aux.items():
    layer, _, name = key.partition('/')
    if not layer.startswith('layer_'):
      continue
    index = int(layer.removeprefix('layer_'))
    entry = layers.setdefault(index, {'layer': index})
    entry[name] = value.tolist() if value.ndim else float(value)
  return {'layers': [layers[i] for i in sorted(layers)]}


def evaluate(config, workdir: str) -> dict:
  validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.max_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt.directory}: train first '
                            f'(python train.py --config=... --workdir={workdir})')
  logging.info('evaluating %s/%d', ckpt.directory, step)
  state, _ = ckpt.restore(step, layout.abstract)
  ckpt.close()

  names = tokenizer.MODALITIES
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=layout.graphdef,
                                      num_modalities=len(names)))
  batch_sh = sharding.batch_sharding(mesh)
  totals = {k: np.zeros(len(names)) for k in ('loss_sum', 'correct', 'count')}
  unigram = np.zeros((len(names), config.model.vocab_size))
  routing_sums, num_batches = {}, 0  # per-layer MoE metrics, averaged over batches
  examples = config.eval.num_examples or None
  with jax.set_mesh(mesh):
    for batch in pipeline.make_eval_iterator(
        config.data, seq_len=config.seq_len, batch_size=config.eval.batch_size,
        num_examples=examples, process_index=jax.process_index(),
        process_count=jax.process_count()):
      stats, aux = jax.device_get(eval_fn(state['params'], sharding.shard_batch(batch, batch_sh)))
      for k, v in stats.items():
        totals[k] += v
      for k, v in aux.items():
        routing_sums[k] = routing_sums.get(k, 0) + np.asarray(v, np.float64)
      num_batches += 1
      mask = batch['loss_mask'] > 0
      for i in range(len(names)):
        sel = mask & (batch['target_modality'] == i)
        unigram[i] += np.bincount(batch['targets'][sel], minlength=unigram.shape[1])
  # Every process saw its own slice; the device sums are global, the host counts are not.
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    unigram = np.asarray(multihost_utils.process_allgather(unigram)).sum(0)

  report = {'step': int(step), 'modalities': {}}
  for i, name in enumerate(names):
    n = totals['count'][i]
    if n == 0:
      continue
    report['modalities'][name] = {
        'loss': float(totals['loss_sum'][i] / n),
        'unigram_loss': unigram_entropy(unigram[i]),
        'accuracy': float(totals['correct'][i] / n),
        'tokens': int(n),
    }
  if routing_sums:
    report['routing'] = routing_report(
        {k: v / num_batches for k, v in routing_sums.items()})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(report, f, indent=1)
    plots.plot_loss_curves(workdir, names, report)
  return report
