"""Cached decoding (Decoder.init_cache / decode, models/generate.py): a prefill and one token
per step give the logits of the full causal pass (teacher forcing), for every family, on one
device and on a sharded mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dense, moe, moma, mot
from core import partitioning
from models import families, generate
from models import transformer
from training import state as state_lib
from tests.helpers import random_batch, tiny_config

CONFIGS = {
    'dense': lambda: dense.get_config('tiny'),
    'moe_capacity': lambda: moe.get_config('tiny,dispatch=capacity'),  # every 2nd layer
    'moma_ec_mod': lambda: moma.get_config('tiny,mod=1'),
    'moma_topk_pre': lambda: moma.get_config('tiny,router=topk,norm=pre,groups=2t3i'),
    'mot_all_qk': lambda: mot.get_config('tiny,qk_norm=1'),
    'mot_pre_moe': lambda: mot.get_config('tiny,norm=pre,moe=text,untie=ffn,attn'),
}


def small(name, **overrides):
  c = tiny_config(CONFIGS[name](), **overrides)
  c.seq_len = 24
  return c


@functools.cache
def model_and_tokens(name):
  c = small(name)
  model = state_lib.make_model(c, 0)
  tokens = jnp.asarray(random_batch(4, c.seq_len, seed=5)['tokens'])
  return c, model, tokens


def full_logits(model, tokens):
  return model({'tokens': tokens, 'modality': transformer.modality_of(tokens)},
               causal=True)[0]


def cached_logits(model, tokens, prefill, max_len):
  """Prefill the first `prefill[b]` tokens of each row (one call), then one token per call;
  -> logits [B, T] at every position from the cached calls."""
  B, T = tokens.shape
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, tokens, prefill):
    m = nnx.merge(graphdef, params)
    cache = m.init_cache(B, max_len)
    first, cache = m.decode(tokens, cache, jnp.zeros((B,), jnp.int32))  # the whole buffer
    def step(cache, t):  # row b decodes position min(prefill[b] + t, T - 1)
      pos = jnp.minimum(prefill + t, T - 1)
      logits, cache = m.decode(jnp.take_along_axis(tokens, pos[:, None], axis=1), cache, pos)
      return cache, logits[:, 0]
    # Each row rewinds to its own prefill length: positions >= prefill[b] are decoded again,
    # one at a time, over what the buffer-wide prefill left in the cache beyond them.
    _, steps = jax.lax.scan(step, cache, jnp.arange(T))
    return first, jnp.swapaxes(steps, 0, 1)
  first, steps = run(params, tokens, prefill)
  out = np.array(first)
  steps = np.asarray(steps)
  for b in range(B):
    n = T - int(prefill[b])
    out[b, prefill[b]:] = steps[b, :n]
  return out


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_prefill_and_cached_steps_equal_the_full_causal_pass(name):
  c, model, tokens = model_and_tokens(name)
  reason = families.get(c.model.family).decode_unsupported(state_lib.model_spec(c))
  assert reason is None, reason
  T = tokens.shape[1]
  if c.model.get('moe', {}).get('dispatch') == 'capacity':  # decoding drops nothing
    c.model.moe.dispatch = 'dropless'
    model = nnx.merge(nnx.split(state_lib.make_model(c, 0))[0], nnx.split(model)[1])
  want = np.asarray(full_logits(model, tokens))
  prefill = jnp.asarray([1, 7, T // 2, T - 1], jnp.int32)  # ragged prompts per row
  got = cached_logits(model, tokens, prefill, max_len=T + 5)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('name,mesh', [
    ('moma_ec_mod', dict(data=2, fsdp=2, expert=1, tensor=2)),
    ('mot_pre_moe', dict(data=2, fsdp=1, expert=2, tensor=2)),
])
def test_sharded_decoding_equals_unsharded(name, mesh):
  c, model, tokens = model_and_tokens(name)
  T = tokens.shape[1]
  prefill = jnp.asarray([3, 9, T // 2, T - 2], jnp.int32)
  want = cached_logits(model, tokens, prefill, max_len=T)
  m = partitioning.make_mesh(mesh, devices=jax.devices()[:int(np.prod(list(mesh.values())))])
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, partitioning.tree_shardings(params, m))
  with jax.set_mesh(m):
    got = cached_logits(nnx.merge(graphdef, params), jax.device_put(
        tokens, partitioning.batch_sharding(m)), prefill, max_len=T)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('name', ['moma_ec_mod', 'mot_all_qk'])
def test_cached_greedy_generation_equals_the_recomputing_loop(name):
  from models import sampling
  c, model, tokens = model_and_tokens(name)
  graphdef, params = nnx.split(model)
  P, new = 6, 10
  prompt = tokens[:, :P]
  want = np.asarray(generate.recompute_greedy(graphdef, params, prompt, new))
  run = generate.generator(graphdef, num_new=new, max_len=P + new + 3,
                           sampling=sampling.Sampling(temperature=0.0))
  got = np.asarray(run(params, prompt, jnp.full((4,), P, jnp.int32), jax.random.key(0)))
  # Rows stop at EOS (then PAD); the recomputing loop goes on.
  for b in range(4):
    row, ref = got[b, :P + new], want[b]
    stop = np.nonzero(row[P:] == 2)[0]
    n = P + (stop[0] + 1 if stop.size else new)
    np.testing.assert_array_equal(row[:n], ref[:n])
    assert (got[b, n:] == 0).all()


def test_sampled_generation_is_seeded_and_keeps_the_format():
  from models import sampling
  c, model, tokens = model_and_tokens('moma_ec_mod')
  graphdef, params = nnx.split(model)
  grammar = sampling.Grammar(num_image_tokens=5, num_image_codes=64)
  run = generate.generator(graphdef, num_new=16, max_len=c.seq_len,
                           sampling=sampling.Sampling(temperature=1.5, top_k=50),
                           grammar=grammar)
  bos, boi = 1, 3
  prompt = jnp.asarray([[bos, 8 + 97, boi, 0], [bos, boi, 264, 265], [bos, 8 + 98, 8 + 99, 0],
                        [bos, 0, 0, 0]], jnp.int32)
  lengths = jnp.asarray([3, 4, 3, 1], jnp.int32)
  a = np.asarray(run(params, prompt, lengths, jax.random.key(1)))
  np.testing.assert_array_equal(a, np.asarray(run(params, prompt, lengths, jax.random.key(1))))
  assert (a != np.asarray(run(params, prompt, lengths, jax.random.key(2)))).any()
  for b in range(4):
    row = a[b]
    L = int(lengths[b])
    np.testing.assert_array_equal(row[:L], np.asarray(prompt[b, :L]))
    # After BOI exactly 5 image codes, then EOI; image codes nowhere else; nothing after EOS.
    state = -1
    assert (row[L + 16:] == 0).all()
    for t, tok in enumerate(row[1:L + 16], start=1):
      if state == -2:
        assert tok == 0, (b, t, row)
      elif 0 <= state < 5:
        assert 264 <= tok < 264 + 64, (b, t, row)
        state += 1
      elif state == 5:
        assert tok == 4, (b, t, row)
        state = -1
      else:
        assert tok in (2, 3) or 8 <= tok < 264, (b, t, row)
        state = {2: -2, 3: 0}.get(int(tok), -1)


def test_a_decoding_step_compiles_once_for_every_position():
  c, model, tokens = model_and_tokens('moma_ec_mod')
  graphdef, params = nnx.split(model)
  B, T = tokens.shape

  @jax.jit
  def step(params, cache, token, index):
    return nnx.merge(graphdef, params).decode(token, cache, index)
  cache = model.init_cache(B, T)
  for t in (0, 5, 11):
    _, cache = step(params, cache, tokens[:, t:t + 1], jnp.full((B,), t, jnp.int32))
  assert step._cache_size() == 1
