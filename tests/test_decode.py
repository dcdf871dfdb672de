"""Cached decoding (Decoder.init_cache / decode, models/generate.py): a prefill and one token
per step give the logits of the full causal pass (teacher forcing), for every family, on one
device and on a sharded mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dense, mamba, moe, moiie, moma, mot
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
    'moiie': lambda: moiie.get_config('tiny,groups=2t3i,shared=1'),
    # the dense-to-sparse gates route as at eval when decoding (schedules' end, no noise)
    'moe_evomoe': lambda: moe.get_config('tiny,router=evomoe,experts=4'),
    'moe_activation_gate': lambda: moe.get_config(
        'tiny,router=activation_gate,activation=tanh,threshold=0.2,k=3,experts=4'),
    'mamba_hybrid_mom': lambda: mamba.get_config('tiny,untie=all,attn_every=2,chunk=8'),
    # MoMa FFNs in the hybrid: expert choice decodes with the auxiliary routers
    'mamba_hybrid_moma': lambda: mamba.get_config(
        'tiny,untie=all,attn_every=2,chunk=8,ffn=moma,groups=2t3i'),
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
  """A prefill of the first `prefill` tokens (one call), the next 3 in one call, then one
  token per call (what a recurrent state allows: no position is decoded twice) -> logits
  [B, T] of every position from the cached calls."""
  B, T = tokens.shape
  graphdef, params = nnx.split(model)
  at = lambda t: jnp.full((B,), t, jnp.int32)  # noqa: E731

  @jax.jit
  def run(params, tokens):
    m = nnx.merge(graphdef, params)
    cache = m.init_cache(B, max_len)
    first, cache = m.decode(tokens[:, :prefill], cache, at(0))
    chunk, cache = m.decode(tokens[:, prefill:prefill + 3], cache, at(prefill))

    def step(cache, t):
      logits, cache = m.decode(jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1), cache,
                               jnp.full((B,), t, jnp.int32))
      return cache, logits[:, 0]
    _, steps = jax.lax.scan(step, cache, jnp.arange(prefill + 3, T))
    return jnp.concatenate([first, chunk, jnp.swapaxes(steps, 0, 1)], axis=1)
  return np.asarray(run(params, tokens))


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
  got = cached_logits(model, tokens, 7, max_len=T + 5)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('name,mesh', [
    ('moma_ec_mod', dict(data=2, fsdp=2, expert=1, tensor=2)),
    ('mot_pre_moe', dict(data=2, fsdp=1, expert=2, tensor=2)),
    ('mamba_hybrid_mom', dict(data=2, fsdp=2, expert=1, tensor=2)),
])
def test_sharded_decoding_equals_unsharded(name, mesh):
  c, model, tokens = model_and_tokens(name)
  T = tokens.shape[1]
  want = cached_logits(model, tokens, 9, max_len=T)
  m = partitioning.make_mesh(mesh, devices=jax.devices()[:int(np.prod(list(mesh.values())))])
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, partitioning.tree_shardings(params, m))
  with jax.set_mesh(m):
    got = cached_logits(nnx.merge(graphdef, params), jax.device_put(
        tokens, partitioning.batch_sharding(m)), 9, max_len=T)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('name', ['moma_ec_mod', 'mamba_hybrid_mom'])
def test_cached_greedy_generation_equals_the_recomputing_loop(name):
  """Rows with prompts of 6 and 9 tokens in one batch (the longer fed token by token after
  a 6-token prefill) generate what the recomputing loop generates from each alone."""
  from models import sampling
  c, model, tokens = model_and_tokens(name)
  graphdef, params = nnx.split(model)
  new = 8
  lengths = np.array([6, 9, 6, 9], np.int32)
  run = generate.generator(graphdef, num_new=new, max_len=9 + new + 2,
                           sampling=sampling.Sampling(temperature=0.0))
  got = np.asarray(run(params, tokens[:, :9], jnp.asarray(lengths), jax.random.key(0)))
  for P in (6, 9):
    want = np.asarray(generate.recompute_greedy(graphdef, params, tokens[:, :P], new))
    for b in np.nonzero(lengths == P)[0]:
      row, ref = got[b, :P + new], want[b]
      stop = np.nonzero(row[P:] == 2)[0]  # rows stop at EOS (then PAD); the loop goes on
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
