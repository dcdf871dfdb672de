"""Cached decoding against the full-recompute loop, in one run: tokens/s of each and their
ratio, and the prefill time, per config.

  python benchmarks/decode.py                       # 2-core CPU defaults: ~2 minutes
  python benchmarks/decode.py --configs=moma.py:tiny --seq_len=512 --batch=4

Per config (a random init of its model at --seq_len): a prompt of --prompt_len tokens, then
greedy decoding to --seq_len tokens, every row running every step (no stop at EOS):
  cached     models/generate.generator: one prefill, then one token per step over the K/V
             cache, the whole loop one compiled program;
  recompute  models/generate.recompute_greedy: the whole [B, seq_len] buffer through the
             full causal pass at every step (one compiled step).
Both are compiled and warmed up first, then timed in --repeats alternating repeats; the
ratio is the median of the per-repeat ratios. The prefill is timed separately on a prompt
of --seq_len / 2 tokens (Decoder.decode with index 0). Results: docs/generation.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import dense, moe, moma, mot  # noqa: E402
from models import generate, sampling  # noqa: E402
from training import metrics, state as state_lib  # noqa: E402
from tests.helpers import random_batch  # noqa: E402

_CONFIGS = flags.DEFINE_list('configs', ['dense.py:tiny', 'moe.py:tiny', 'moma.py:tiny',
                                         'mot.py:tiny'], 'configs/<file>:<arg> to time.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Rows decoded together.')
_PROMPT = flags.DEFINE_integer('prompt_len', 16, 'Prompt tokens before decoding.')
_SEQ = flags.DEFINE_integer('seq_len', 256, 'Tokens per row at the end (the buffer).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed alternating repeats.')

MODULES = {'dense.py': dense, 'moe.py': moe, 'moma.py': moma, 'mot.py': mot}


def _timed(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def bench(name: str) -> dict:
  file, _, arg = name.partition(':')
  config = MODULES[file].get_config(arg or 'tiny')
  config.seq_len = _SEQ.value
  model = state_lib.make_model(config, 0)
  graphdef, params = nnx.split(model)
  B, P, T = _BATCH.value, _PROMPT.value, _SEQ.value
  tokens = jnp.asarray(random_batch(B, T, seed=0)['tokens'])
  prompt, new = tokens[:, :P], T - P
  cached = generate.generator(graphdef, num_new=new, max_len=T,
                              sampling=sampling.Sampling(temperature=0.0), stop_at_eos=False)
  lengths, key = jnp.full((B,), P, jnp.int32), jax.random.key(0)
  run_cached = lambda: cached(params, prompt, lengths, key)  # noqa: E731
  run_full = lambda: generate.recompute_greedy(graphdef, params, prompt, new)  # noqa: E731
  compile_s = _timed(run_cached)
  _timed(run_full)
  half = T // 2

  @jax.jit
  def prefill(params, prompt):
    m = nnx.merge(graphdef, params)
    return m.decode(prompt, m.init_cache(B, T), jnp.zeros((B,), jnp.int32))[0]
  _timed(lambda: prefill(params, tokens[:, :half]))
  times = {'cached': [], 'recompute': [], 'prefill': []}
  for _ in range(_REPEATS.value):
    times['cached'].append(_timed(run_cached))
    times['recompute'].append(_timed(run_full))
    times['prefill'].append(_timed(lambda: prefill(params, tokens[:, :half])))
  ratio = statistics.median(f / c for c, f in zip(times['cached'], times['recompute']))
  out = {'config': name, 'batch': B, 'prompt_len': P, 'seq_len': T, 'new_tokens': new,
         'cached_tokens_per_s': B * new / statistics.median(times['cached']),
         'recompute_tokens_per_s': B * new / statistics.median(times['recompute']),
         'cached_speedup': ratio, 'cached_compile_s': compile_s,
         f'prefill_{half}_s': statistics.median(times['prefill'])}
  print(f"{name}: cached {out['cached_tokens_per_s']:,.0f} tok/s, recompute "
        f"{out['recompute_tokens_per_s']:,.0f} tok/s, cached/recompute speed ratio "
        f"{ratio:.1f}x; prefill of {half} tokens x {B} rows "
        f"{out[f'prefill_{half}_s'] * 1e3:.1f} ms (compile of the cached loop "
        f"{compile_s:.1f} s)", flush=True)
  return out


def main(argv):
  del argv
  metrics.quiet_library_logs()
  print(f'{jax.devices()[0].platform} x{jax.device_count()}, batch {_BATCH.value}, prompt '
        f'{_PROMPT.value}, seq_len {_SEQ.value}')
  for name in _CONFIGS.value:
    bench(name)


if __name__ == '__main__':
  app.run(main)
