"""The decoder trainer's evaluation of the latest checkpoint in a workdir -> `WORKDIR/eval.json`
+ plots. Evaluators by name (EVALUATORS: 'lm', 'causal', 'generation'); a family lists the
ones it reports (models/families.py). (IMP: projects/imp/evaluate.py writes eval.json
`tasks`.) 'generation' (training/generation.py) continues the prompts of the first
`eval.generation.num_examples` eval sequences and scores them: eval.json `generation`,
WORKDIR/samples.png and samples.json (docs/generation.md).

eval.json:
  {"step": N,
   "modalities": {"text": {"loss", "unigram_loss", "accuracy", "tokens",
                           "causal_loss", "causal_accuracy"},       # causal_*: MoMa, below
                  "image": {...}},
   "aux_step": K,                  # MoMa with an aux run: the aux checkpoint evaluated
   "causal_loss_note": "...",      # MoMa: why there is no causal_loss despite an aux run
   "routing": {"layers": [{"layer": i, "expert_load": [E], "dropped_fraction", ...,
                           "load": {"text": {"text/0": f, ..., "image/3": f}, "image": ...},
                           "mod_selected_fraction": f,
                           "causal_load": {...}, "causal_mod_selected_fraction": f}]},
   "attention": {"sink_share": f, "max_activation": f}}

`loss` is the mean next-token cross-entropy (nats) over that modality's target tokens of
the eval split; `unigram_loss` is the entropy of those same target tokens under their own
unigram distribution on the eval split: the loss of the best context-free predictor, so a
model below it has learnt to use context. `accuracy` is top-1 next-token accuracy.

On the embedded datasets (mm_shapes, mm_scenes) each modality also has `floor`, the mean
exact Bayes-optimal loss of the same tokens (data/floor.py, docs/floor.md: the lowest loss
any model can reach), `excess` = loss - floor with `excess_stderr` (clustered by sequence),
and `by_order`: {"text_first": {"loss", "floor", "excess", "excess_stderr", "tokens"},
"image_first": {...}} for caption-first and image-first sequences. A loss below its floor by
more than FLOOR_SE standard errors can only mean the model sees what it must not (e.g. the
next token): eval.json lists it under `floor_violations` and eval fails. Other datasets get
`floor_note` instead, saying why there is no floor.

`routing` (models with MoE or MoMa layers): each layer's router metrics averaged over the
eval batches; `expert_load[j]` = share of the layer's token-expert pairs routed to expert j.
MoMa layers also give `load[m][e]`: the fraction of modality m's tokens (every position,
padding included) that expert e processed - 0.0 exactly off m's own group, about c_e on it;
in a mixture-of-depths layer the fraction is of the tokens the MoD router selected, and
`mod_selected_fraction` is that selected share. `loss` always uses the batch (training-time)
routing, which sees the whole sequence.

MoMa causal inference: when WORKDIR/aux/ holds a checkpoint of the aux stage
(`train.py --config=...,stage=aux`), the model is evaluated a second time with
`causal=True`, each token routed by the auxiliary routers alone (the decode-time function):
`causal_loss`, `causal_accuracy` per modality and `causal_load`,
`causal_mod_selected_fraction` per layer. The aux run's params hold a frozen copy of the main
model; if that copy differs from the main checkpoint (the main run went on training after
the aux stage started), the causal pass is skipped and `causal_loss_note` says so.

`attention` (every decoder, gated or not; docs/gates.md): `sink_share` is the attention
probability on the first key (position 0; in a mixture-of-depths layer its first selected
token), averaged over heads, layers and the valid (non-PAD) query positions > 0 of the eval
split; `max_activation` the largest |x| of the residual stream after any block over the
valid tokens. Both from the batch-routing pass ('lm'); a family whose attention does not
report sink shares gets `max_activation` only.

Plots (process 0): WORKDIR/loss_curves.png, and for MoMa WORKDIR/routing_load.png (a
modality x expert heat map of `load` per layer; a second row for `causal_load`).
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from core import partitioning
from data import pipeline, tokenizer
from models import families, transformer
from training import checkpoint, plots, state as state_lib, step as step_lib
from training import causal, generation, storage
from training.validate import validate

CAUSAL_KEYS = ('load', 'mod_selected_fraction')  # per-layer metrics reported for causal too
ORDERS = ('text_first', 'image_first')  # training/step.floor_stats' order axis
FLOOR_SE = 3.0  # a loss this many standard errors below its floor is an error


class FloorViolation(ValueError):
  """A loss below the exact floor: the model saw what it must not."""


def unigram_entropy(counts: np.ndarray) -> float:
  """Entropy (nats) of the empirical distribution given by token counts."""
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def load_report(load_ME, modality_names, expert_names) -> dict[str, dict[str, float]]:
  """[M, E] fractions -> {modality: {expert name: fraction}} (MoMa `layer_i/load`)."""
  load = np.asarray(load_ME, np.float64)
  if load.shape != (len(modality_names), len(expert_names)):
    raise ValueError(f'load of shape {load.shape} does not match {len(modality_names)} '
                     f'modalities x {len(expert_names)} experts {list(expert_names)}')
  return {m: {e: float(load[i, j]) for j, e in enumerate(expert_names)}
          for i, m in enumerate(modality_names)}


def _layer_entries(aux: dict[str, np.ndarray], modality_names, expert_names) -> dict[int, dict]:
  layers: dict[int, dict] = {}
  for key, value in aux.items():
    layer, _, name = key.partition('/')
    if not layer.startswith('layer_'):
      continue
    index = int(layer.removeprefix('layer_'))
    entry = layers.setdefault(index, {'layer': index})
    value = np.asarray(value)
    if name == 'load' and expert_names is not None:
      entry['load'] = load_report(value, modality_names, expert_names)
    else:  # MoMa names flatten ('mod/selected_fraction' -> 'mod_selected_fraction')
      name = name.replace('/', '_') if expert_names is not None else name
      entry[name] = value.tolist() if value.ndim else float(value)
  return layers


def routing_report(aux: dict[str, np.ndarray], *, modality_names=None,
                   expert_names=None, causal_aux: dict[str, np.ndarray] | None = None) -> dict:
  """{'layer_1/expert_load': [E], ...} -> {'layers': [{'layer': 1, 'expert_load': [...],
  'dropped_fraction': ..., ...}]}, one entry per routed layer, in layer order.

  With `expert_names` (MoMa), `layer_i/load` [M, E] becomes `load` {modality: {expert:
  fraction}} and nested names flatten with '_'; `causal_aux` (the metrics of the causal
  pass) adds `causal_load` and `causal_mod_selected_fraction`.
  """
  layers = _layer_entries(aux, modality_names, expert_names)
  if causal_aux is not None:
    merge_causal(layers, causal_aux, modality_names, expert_names)
  return {'layers': [layers[i] for i in sorted(layers)]}


def merge_causal(layers: dict[int, dict], causal_aux, modality_names, expert_names) -> None:
  """Adds the causal pass's `causal_load` / `causal_mod_selected_fraction` to the layer
  entries {layer index: entry}."""
  for index, causal in _layer_entries(causal_aux, modality_names, expert_names).items():
    entry = layers.setdefault(index, {'layer': index})
    entry.update({f'causal_{k}': causal[k] for k in CAUSAL_KEYS if k in causal})


def excess_entry(sums: dict[str, np.ndarray], index) -> dict:
  """Loss, floor, excess and its standard error from training/step.floor_stats sums over
  the tokens sums[k][index] selects (a modality, or a modality and an order). The stderr
  treats sequences as the independent units: R = sum d / sum n over sequences, var(R) ~
  sum_b (d_b - R n_b)^2 / N^2 * rows / (rows - 1), N the token count."""
  get = lambda k: float(np.sum(sums[k][index]))  # noqa: E731
  n, rows = get('count'), get('rows')
  loss, floor_ = get('loss_sum') / n, get('floor_sum') / n
  r = loss - floor_
  spread = max(get('d2') - 2 * r * get('dn') + r * r * get('n2'), 0.0)
  stderr = math.sqrt(spread / n ** 2 * rows / (rows - 1)) if rows > 1 else float('nan')
  return {'loss': loss, 'floor': floor_, 'excess': r, 'excess_stderr': stderr,
          'tokens': int(n)}


def floor_report(sums: dict[str, np.ndarray], names) -> tuple[dict, list[str]]:
  """-> ({modality: {'floor', 'excess', 'excess_stderr', 'by_order': {...}}}, violations)."""
  report, violations = {}, []
  for i, name in enumerate(names):
    if sums['count'][i].sum() == 0:
      continue
    whole = excess_entry(sums, i)
    entry = report[name] = {k: whole[k] for k in ('floor', 'excess', 'excess_stderr')}
    entry['by_order'] = {}
    for o, order in enumerate(ORDERS):
      if sums['count'][i, o] > 0:
        entry['by_order'][order] = excess_entry(sums, (i, o))
    for where, e in [(name, whole)] + [(f'{name}/{order}', e)
                                       for order, e in entry['by_order'].items()]:
      if e['excess'] < -FLOOR_SE * (e['excess_stderr'] if e['excess_stderr'] > 0 else 0):
        violations.append(
            f'{where}: loss {e["loss"]:.4f} is below the exact floor {e["floor"]:.4f} by '
            f'{-e["excess"]:.4f} nats/token (> {FLOOR_SE:g} standard errors of '
            f'{e["excess_stderr"]:.4f}): the model sees what it must not (e.g. the next token)')
  return report, violations


class _Totals:
  """Per-modality sums and per-layer routing metrics of one pass over the eval split."""

  def __init__(self, num_modalities: int):
    self.sums = {k: np.zeros(num_modalities) for k in ('loss_sum', 'correct', 'count')}
    self.routing: dict[str, np.ndarray] = {}
    self.batches = 0

  def add(self, stats, aux) -> None:
    for k, v in stats.items():
      self.sums[k] = self.sums.get(k, 0) + np.asarray(v, np.float64)
    for k, v in aux.items():
      self.routing[k] = self.routing.get(k, 0) + np.asarray(v, np.float64)
    self.batches += 1

  def routing_mean(self) -> dict[str, np.ndarray]:
    return {k: v / self.batches for k, v in self.routing.items()}


def restore_latest(config, workdir: str):
  """-> (mesh, state layout, state, step) of the newest checkpoint in `workdir`."""
  mesh = partitioning.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.max_checkpoints, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt.directory}: train first '
                              f'(python train.py --config=... --workdir={workdir})')
    logging.info('evaluating %s/%d', ckpt.directory, step)
    state, _ = ckpt.restore(step, layout.abstract)
  finally:
    ckpt.close()
  return mesh, layout, state, int(step)


def write_report(workdir: str, report: dict) -> None:
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, 'eval.json'), json.dumps(report, indent=1))


class EvalContext(NamedTuple):
  """What every evaluator of one eval.py run reads."""
  config: Any
  workdir: str
  mesh: Any
  layout: state_lib.StateLayout
  params: Any
  step: int
  expert_names: list[str] | None  # the family's, for per-modality loads (MoMa)


class LMEval:
  """'lm': per-modality loss, accuracy, unigram loss, floor and excess (embedded datasets),
  and the routing metrics of routed layers, with the training-time (batch) routing."""

  def __init__(self, ctx: EvalContext):
    self.ctx, self.names = ctx, tokenizer.MODALITIES
    self.fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=ctx.layout.graphdef,
                                        num_modalities=len(self.names),
                                        attention_stats=True, step=np.int32(ctx.step)))
    self.totals = _Totals(len(self.names))
    self.unigram = np.zeros((len(self.names), ctx.config.model.vocab_size))
    self.attention = {}  # transformer.ATTENTION_STATS: sums, and the max

  def add(self, batch, device_batch) -> None:
    stats, aux = jax.device_get(self.fn(self.ctx.params, device_batch))
    for key in transformer.ATTENTION_STATS:
      if key in aux:
        value, old = float(aux.pop(key)), self.attention.get(key)
        self.attention[key] = value if old is None else (
            max(old, value) if key.endswith('max_activation') else old + value)
    self.totals.add(stats, aux)
    mask = batch['loss_mask'] > 0
    for i in range(len(self.names)):
      sel = mask & (batch['target_modality'] == i)
      self.unigram[i] += np.bincount(batch['targets'][sel], minlength=self.unigram.shape[1])

  def finish(self, report: dict) -> None:
    # Every process saw its own slice; the device sums are global, the host counts are not.
    unigram = self.unigram
    if jax.process_count() > 1:
      unigram = np.asarray(multihost_utils.process_allgather(unigram)).sum(0)
    sums = self.totals.sums
    for i, name in enumerate(self.names):
      n = sums['count'][i]
      if n:
        report['modalities'][name] = {
            'loss': float(sums['loss_sum'][i] / n), 'unigram_loss': unigram_entropy(unigram[i]),
            'accuracy': float(sums['correct'][i] / n), 'tokens': int(n)}
    floor_note = pipeline.floor_support(self.ctx.config.data)
    if floor_note is None:
      floors, violations = floor_report({k.removeprefix('floor/'): v for k, v in sums.items()
                                         if k.startswith('floor/')}, self.names)
      for name, entry in report['modalities'].items():
        entry.update(floors[name])
      if violations:
        report['floor_violations'] = violations
    else:
      report['floor_note'] = floor_note
    if self.totals.routing:
      report['routing'] = routing_report(self.totals.routing_mean(), modality_names=self.names,
                                         expert_names=self.ctx.expert_names)
    report['attention'] = attention_report(self.attention)


def attention_report(totals: dict) -> dict:
  """Summed/maxed transformer.ATTENTION_STATS -> eval.json `attention`."""
  out = {}
  count = totals.get('attention/sink_count', 0.0)
  if count:
    out['sink_share'] = totals['attention/sink_sum'] / count
  if 'attention/max_activation' in totals:
    out['max_activation'] = totals['attention/max_activation']
  return out


class CausalEval:
  """'causal' (families with auxiliary routers): the model once more with `causal=True`,
  each token routed by the aux stage's routers alone (WORKDIR/aux), when that run holds the
  main checkpoint's model: `causal_loss`, `causal_accuracy`, `causal_excess` per modality,
  `causal_load`, `causal_mod_selected_fraction` per routed layer; else a note why not."""

  def __init__(self, ctx: EvalContext):
    self.ctx, self.names = ctx, tokenizer.MODALITIES
    self.params, self.aux_step, self.note = causal.load_aux_params(
        ctx.workdir, ctx.params, ctx.step, ctx.mesh)
    self.fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=ctx.layout.graphdef,
                                        num_modalities=len(self.names), causal=True))
    self.totals = _Totals(len(self.names))

  def add(self, batch, device_batch) -> None:
    del batch
    if self.params is not None:
      self.totals.add(*jax.device_get(self.fn(self.params, device_batch)))

  def finish(self, report: dict) -> None:
    if self.params is not None:
      sums = self.totals.sums
      for i, name in enumerate(self.names):
        entry = report['modalities'].get(name)
        if entry is not None:
          entry['causal_loss'] = float(sums['loss_sum'][i] / sums['count'][i])
          entry['causal_accuracy'] = float(sums['correct'][i] / sums['count'][i])
          if 'floor' in entry:
            entry['causal_excess'] = entry['causal_loss'] - entry['floor']
      layers = {e['layer']: e for e in report.setdefault('routing', {'layers': []})['layers']}
      merge_causal(layers, self.totals.routing_mean(), self.names, self.ctx.expert_names)
      report['routing']['layers'] = [layers[i] for i in sorted(layers)]
    if self.aux_step is not None:
      report['aux_step'] = int(self.aux_step)
    if self.note:
      report['causal_loss_note'] = self.note


# A family's `evaluators` name these.
EVALUATORS = {'lm': LMEval, 'causal': CausalEval, 'generation': generation.GenerationEval}


def evaluate(config, workdir: str) -> dict:
  """The decoder trainer's eval: the family's evaluators (models/families.py) over one pass
  of the eval split -> WORKDIR/eval.json and plots."""
  validate(config, jax.device_count())
  mesh, layout, state, step = restore_latest(config, workdir)
  family = families.get(config.model.family)
  ctx = EvalContext(config, workdir, mesh, layout, state['params'], step,
                    family.expert_names(state_lib.model_spec(config)))
  evaluators = [EVALUATORS[name](ctx) for name in family.evaluators]
  batch_sh = partitioning.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    for batch in pipeline.make_eval_iterator(
        config.data, seq_len=config.seq_len, batch_size=config.eval.batch_size,
        num_examples=config.eval.num_examples or None, process_index=jax.process_index(),
        process_count=jax.process_count(),
        with_floor=pipeline.floor_support(config.data) is None):
      device_batch = partitioning.shard_batch(batch, batch_sh)
      for ev in evaluators:
        ev.add(batch, device_batch)
  report = {'step': int(step), 'modalities': {}}
  for ev in evaluators:
    ev.finish(report)
  write_report(workdir, report)
  if jax.process_index() == 0:
    plots.plot_loss_curves(workdir, tokenizer.MODALITIES, report)
    if ctx.expert_names is not None:
      plots.plot_routing_load(workdir, report)
  if report.get('floor_violations'):
    raise FloorViolation('; '.join(report['floor_violations']))
  return report
