"""Generation from a trained run: prompts, the params that decode causally, the decoding
call on the run's mesh, the samples' grid and JSON (sample.py), and eval's `generation`.

Prompts are the two directions of the data's sequences (data/tokenizer.py):

  text -> image     [BOS] caption [BOI]          the model writes the image codes, EOI, EOS
  image -> caption  [BOS] [BOI] codes [EOI]      the model writes the caption, EOS

A model with auxiliary routers (MoMa's expert choice, mixture-of-depths) decodes with the
aux stage's params (WORKDIR/aux, training/causal.py): its batch routing sees the future,
so without them it cannot generate and says so. Sampling (config.eval.generation) is
greedy by default; the format grammar of models/sampling.py keeps every image exactly
`grid**2` codes long and image codes inside images only.

eval.json `generation` (embedded datasets, whose generator is known, data/scoring.py):
  {"text_to_image": {"consistent": f, "examples": n},    # images the caption allows
   "image_to_caption": {"consistent": f, "examples": n}, # captions true of the image
   "sampling": {...}, "step": N (the params decoded: the aux run's for MoMa)}
and WORKDIR/samples.png, the first prompts with their generations.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from core import partitioning
from data import pipeline, scoring, tokenizer
from models import families, generate, sampling as sampling_lib
from training import causal, plots, state as state_lib, storage

DIRECTIONS = ('text_to_image', 'image_to_caption')
GRID = 16  # prompts drawn in samples.png


def grammar_of(data_cfg) -> sampling_lib.Grammar:
  """The sequence format of the run's data: grid**2 codes per image from its codebook."""
  grid = data_cfg.image_size // data_cfg.patch_size
  codes = pipeline.image_vocab_size(data_cfg) or tokenizer.num_image_codes(
      pipeline.codebook(data_cfg))
  return sampling_lib.Grammar(num_image_tokens=grid * grid, num_image_codes=codes)


def sampling_of(gen_cfg) -> sampling_lib.Sampling:
  s = sampling_lib.Sampling(temperature=float(gen_cfg.temperature), top_k=int(gen_cfg.top_k),
                            top_p=float(gen_cfg.top_p))
  s.check()
  return s


def text_prompt(caption: str) -> np.ndarray:
  """[BOS] caption [BOI]: the model draws the image."""
  if not caption.strip():
    raise ValueError('--prompt is empty: give a caption, e.g. "a large red circle at the '
                     'top left"')
  return np.concatenate([[tokenizer.BOS], tokenizer.encode_text(caption),
                         [tokenizer.BOI]]).astype(np.int32)


def image_prompt(image_ids: np.ndarray) -> np.ndarray:
  """[BOS] [BOI] image [EOI]: the model writes the caption."""
  return np.concatenate([[tokenizer.BOS, tokenizer.BOI], image_ids,
                         [tokenizer.EOI]]).astype(np.int32)


def prompt_of_sequence(tokens: np.ndarray) -> np.ndarray | None:
  """An eval sequence's own prompt: its caption (text first) or its image (image first);
  None for padding rows and sequences cut before the prompt ends."""
  t = np.asarray(tokens)
  if t[0] != tokenizer.BOS or len(t) < 2:
    return None
  stop = tokenizer.EOI if t[1] == tokenizer.BOI else tokenizer.BOI
  end = np.nonzero(t == stop)[0]
  return t[:end[0] + 1].astype(np.int32) if end.size else None


def direction_of(prompt: np.ndarray) -> str:
  return DIRECTIONS[1] if len(prompt) > 1 and prompt[1] == tokenizer.BOI else DIRECTIONS[0]


def decoding_params(workdir: str, params, step: int, mesh):
  """-> (params to decode with, their step, None) or (None, None, why not)."""
  if not causal.has_aux_routers(params):
    return params, step, None
  aux, aux_step, note = causal.load_aux_params(workdir, params, step, mesh)
  if aux is None:
    return None, None, note or (
        'this model routes with the whole sequence (expert choice / mixture-of-depths) and '
        'decodes with its auxiliary routers: train them first (train.py --config=...,'
        f'stage=aux --workdir={workdir})')
  return aux, aux_step, None


def room_needed(config, prompt: np.ndarray) -> int:
  """Positions a prompt needs: itself, and for a caption the image's codes and EOI."""
  if direction_of(prompt) == DIRECTIONS[0]:
    return len(prompt) + grammar_of(config.data).num_image_tokens + 1
  return len(prompt) + 1


def check_prompts(config, prompts: list[np.ndarray]) -> None:
  """One-line errors for prompts the model cannot continue (before compiling)."""
  spec = state_lib.model_spec(config)
  grammar = grammar_of(config.data)
  for p in prompts:
    generate.check(spec, prompt_len=len(p), max_len=config.seq_len)
    if room_needed(config, p) > config.seq_len:
      raise ValueError(f'the prompt has {len(p)} tokens: with the image\'s '
                       f'{grammar.num_image_tokens} codes and EOI it is longer than the '
                       f'{config.seq_len} positions the model was trained on (seq_len)')


def run_generation(config, mesh, graphdef, params, prompts: list[np.ndarray], *,
                   sampling: sampling_lib.Sampling, seed: int, rows: int | None = None
                   ) -> np.ndarray:
  """Each prompt continued on the run's mesh -> int32 [len(prompts), seq_len] (this
  process's prompts; every process calls it with the same number `rows` of them, padded
  to a multiple of the local batch shards)."""
  check_prompts(config, prompts)
  shards = max(1, partitioning.batch_shards(mesh) // jax.process_count())
  n = max(len(prompts), rows or 0, 1)
  n = -(-n // shards) * shards
  P = max(len(p) for p in prompts) if prompts else 1
  buf = np.full((n, P), tokenizer.PAD, np.int32)
  buf[:, 0] = tokenizer.BOS
  lengths = np.ones(n, np.int32)
  for i in range(n):  # rows past the prompts repeat the first (their output is dropped)
    p = prompts[i] if i < len(prompts) else (prompts[0] if prompts else buf[i, :1])
    buf[i, :len(p)], lengths[i] = p, len(p)
  run = generate.generator(graphdef, num_new=config.seq_len, max_len=config.seq_len,
                           sampling=sampling, grammar=grammar_of(config.data))
  sh = partitioning.batch_sharding(mesh)
  prefill = int(lengths.min())  # every process compiles the same program
  if jax.process_count() > 1:
    prefill = int(np.min(multihost_utils.process_allgather(np.int32(prefill))))
  with jax.set_mesh(mesh):
    out = run(params, partitioning.shard_batch({'p': buf}, sh)['p'],
              partitioning.shard_batch({'l': lengths}, sh)['l'], jax.random.key(seed),
              prefill=prefill)
    out = multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 \
        else np.asarray(out)
  local = n * jax.process_index()
  return np.asarray(out)[local:local + len(prompts)]


@dataclasses.dataclass
class Sample:
  """One prompt and its generation, split into what a reader sees."""
  direction: str
  prompt: list[int]
  generated: list[int]
  caption: str  # the prompt's (text -> image) or the generated one
  image_ids: list[int]  # the prompt's image (image -> caption) or the generated one
  consistent: bool | None = None  # data/scoring.py, on the embedded datasets

  def as_json(self) -> dict:
    return dataclasses.asdict(self)


def split_sample(prompt: np.ndarray, row: np.ndarray) -> Sample:
  gen = row[len(prompt):]
  gen = gen[:np.argmax(gen == tokenizer.EOS) + 1] if (gen == tokenizer.EOS).any() else gen
  gen = gen[gen != tokenizer.PAD]
  whole = np.concatenate([prompt, gen])
  images = whole[whole >= tokenizer.IMAGE_OFFSET]
  direction = direction_of(prompt)
  text = prompt if direction == DIRECTIONS[0] else gen
  return Sample(direction, prompt.tolist(), gen.tolist(), tokenizer.decode_text(text),
                images.tolist())


def score(samples: list[Sample], data_cfg) -> None:
  """Sets each sample's `consistent` from the dataset's generator (data/scoring.py)."""
  model = pipeline.floor_model(data_cfg)[0]
  for s in samples:
    s.consistent = scoring.score_sequence(np.asarray(s.prompt + s.generated), model)[1]


def draw(path: str, samples: list[Sample], data_cfg, title: str) -> None:
  grid = data_cfg.image_size // data_cfg.patch_size
  book = pipeline.codebook(data_cfg)
  panels = [(tokenizer.decode_image(s.image_ids, grid, 1, book), s.direction, s.caption,
             s.consistent) for s in samples]
  plots.plot_samples(path, panels, title)


def write_samples(workdir_or_path: str, samples: list[Sample], extra: dict) -> None:
  storage.write_text(workdir_or_path, json.dumps(
      {**extra, 'samples': [s.as_json() for s in samples]}, indent=1))


class GenerationEval:
  """'generation': the first `eval.generation.num_examples` eval sequences' prompts
  continued (each in its own direction), scored on the embedded datasets -> eval.json
  `generation` and WORKDIR/samples.png."""

  def __init__(self, ctx):
    self.ctx = ctx
    self.cfg = ctx.config.eval.generation
    self.prompts: list[np.ndarray] = []
    self.want = math.ceil(self.cfg.num_examples / jax.process_count())

  def add(self, batch, device_batch) -> None:
    del device_batch
    for row in batch['tokens']:
      if len(self.prompts) < self.want:
        p = prompt_of_sequence(row)  # a caption the image cannot follow in seq_len: skipped
        if p is not None and room_needed(self.ctx.config, p) <= self.ctx.config.seq_len:
          self.prompts.append(p)

  def finish(self, report: dict) -> None:
    if not self.cfg.num_examples:
      return
    ctx = self.ctx
    entry = report['generation'] = {}
    reason = families.get(ctx.config.model.family).decode_unsupported(
        state_lib.model_spec(ctx.config))
    if reason:
      entry['note'] = reason
      return
    params, step, note = decoding_params(ctx.workdir, ctx.params, ctx.step, ctx.mesh)
    if params is None:
      entry['note'] = note
      return
    sampling = sampling_of(self.cfg)
    out = run_generation(ctx.config, ctx.mesh, ctx.layout.graphdef, params, self.prompts,
                         sampling=sampling, seed=self.cfg.seed, rows=self.want)
    samples = [split_sample(p, r) for p, r in zip(self.prompts, out)]
    entry.update(step=int(step), sampling=dataclasses.asdict(sampling))
    scored = pipeline.floor_support(ctx.config.data) is None
    if scored:
      score(samples, ctx.config.data)
      sums = np.array([[sum(s.direction == d for s in samples),
                        sum(bool(s.consistent) for s in samples if s.direction == d)]
                       for d in DIRECTIONS], np.float64)
      if jax.process_count() > 1:
        sums = np.asarray(multihost_utils.process_allgather(sums)).sum(0)
      for d, (n, ok) in zip(DIRECTIONS, sums):
        if n:
          entry[d] = {'consistent': float(ok / n), 'examples': int(n)}
      if not sums[:, 0].sum():
        entry['note'] = (f'no eval prompt leaves room for its generation in '
                         f'seq_len={ctx.config.seq_len}')
    else:
      entry['note'] = f'not scored: {pipeline.floor_support(ctx.config.data)}'
    if jax.process_index() == 0:
      draw(storage.join(ctx.workdir, 'samples.png'), samples[:GRID], ctx.config.data,
           f'step {step}: eval prompts and generations')
      write_samples(storage.join(ctx.workdir, 'samples.json'), samples, dict(entry))
    logging.info('generation: %s', {k: v for k, v in entry.items() if k in DIRECTIONS})
