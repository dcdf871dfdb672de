"""models/sampling.py: top-k / top-p against a numpy reference, draw frequencies,
seeding, greedy, and the token-format grammar against an independent numpy validator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import tokenizer as tok
from models import sampling as S

# ---------------------------------------------------------------------------
# numpy references (written independently of models/sampling.py)


def np_filter(logits, temperature, top_k, top_p, allowed=None):
  """-> (kept bool [B, V], tempered float64 logits [B, V], ambiguous bool [B]).

  float64 after the (float32) temperature division; stable argsort of -logits, so ties
  go to the lower id. A row is ambiguous if a cumulative probability lies within 1e-5
  of top_p (float32 vs float64 rounding could then legitimately differ)."""
  x = np.asarray(logits, np.float32)
  if allowed is not None:
    x = np.where(allowed, x, np.float32(-np.inf))
  if temperature > 0:
    x = x / np.float32(temperature)
  x = x.astype(np.float64)
  B, V = x.shape
  kept = np.zeros((B, V), bool)
  ambiguous = np.zeros(B, bool)
  for b in range(B):
    order = np.argsort(-x[b], kind='stable')
    k = top_k if top_k > 0 else V
    cand = [i for i in order[:k] if np.isfinite(x[b, i])]
    if top_p < 1:
      z = x[b, cand]
      p = np.exp(z - z.max())
      p /= p.sum()
      cum = np.cumsum(p)
      m = int(np.argmax(cum >= top_p)) + 1 if (cum >= top_p).any() else len(cand)
      ambiguous[b] = bool(np.any(np.abs(cum[:-1] - top_p) < 1e-5))
      cand = cand[:m]
    kept[b, cand] = True
  return kept, x, ambiguous


def np_validate(seq, n, codes):
  """States after each prefix of `seq` (a row starting with BOS) under the format
  [BOS] (text | [BOI] n codes [EOI])* [EOS] PAD*; AssertionError at the first bad token.
  States: -1 text, c = codes so far inside an image, -2 done."""
  mode, count, states = 'start', 0, []
  for i, t in enumerate(int(t) for t in seq):
    if mode == 'start':
      ok, mode = t == tok.BOS, 'text'
    elif mode == 'text':
      ok = t in (tok.BOI, tok.EOS) or tok.TEXT_OFFSET <= t < tok.TEXT_OFFSET + 256
      mode, count = {tok.BOI: ('image', 0), tok.EOS: ('done', 0)}.get(t, (mode, count))
    elif mode == 'image' and count < n:
      ok = tok.IMAGE_OFFSET <= t < tok.IMAGE_OFFSET + codes
      count += 1
    elif mode == 'image':
      ok, mode = t == tok.EOI, 'text'
    else:
      ok = t == tok.PAD
    assert ok, f'token {t} at {i} in {list(seq)}'
    states.append({'text': -1, 'image': count, 'done': -2}[mode])
  return states


def random_prefixes(rng, num, n, codes, max_text=6):
  """Valid prompts (BOS first) cut at random lengths >= 1: tokens [num, P], lengths."""
  seqs = []
  for _ in range(num):
    text = tok.encode_bytes(rng.integers(0, 256, rng.integers(0, max_text + 1)).astype(
        np.uint8).tobytes())
    image = None if rng.random() < 0.2 else rng.integers(0, codes, n) + tok.IMAGE_OFFSET
    seq = tok.build_sequence(text, image, image_first=bool(rng.integers(2)))
    seqs.append(seq[:rng.integers(1, len(seq) + 1)])
  P = max(len(s) for s in seqs)
  tokens = np.zeros((num, P), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)] = s
  return tokens, np.array([len(s) for s in seqs], np.int32)


# ---------------------------------------------------------------------------
# filter_logits vs numpy

SETTINGS = [(1.0, 0, 1.0), (1.0, 3, 1.0), (0.7, 0, 0.9), (1.0, 5, 0.5), (2.0, 1, 1.0),
            (0.5, 10, 0.3), (1.0, 0, 0.05), (1.3, 7, 0.97), (0.0, 4, 0.8)]


@pytest.mark.parametrize('temperature,top_k,top_p', SETTINGS)
def test_filter_matches_numpy(temperature, top_k, top_p):
  rng = np.random.default_rng(hash((temperature, top_k, top_p)) % 2**32)
  B, V = 96, 24
  logits = np.round(rng.normal(0, 1.5, (B, V)) * 2) / 2  # multiples of 0.5: many exact ties
  logits = logits.astype(np.float32)
  allowed = rng.random((B, V)) < 0.7
  allowed[:B // 3] = True  # some rows unmasked
  cfg = S.Sampling(temperature, top_k, top_p)
  fn = jax.jit(S.filter_logits, static_argnames='sampling')
  out = np.asarray(fn(jnp.asarray(logits), cfg, jnp.asarray(allowed)))
  kept, ref, ambiguous = np_filter(logits, temperature, top_k, top_p, allowed)
  assert ambiguous.mean() < 0.1
  ok = ~ambiguous
  np.testing.assert_array_equal(np.isfinite(out)[ok], kept[ok])
  np.testing.assert_array_equal(out[~np.isfinite(out)], -np.inf)
  np.testing.assert_allclose(out[kept & ok[:, None]], ref[kept & ok[:, None]], rtol=1e-6)
  assert kept.any(-1).all()  # at least one token survives every row
  if top_k or top_p < 1:  # the setting must exclude something beyond the mask
    assert (kept.sum(-1) < allowed.sum(-1)).any()


def test_ties_and_top_p_boundary():
  fn = jax.jit(S.filter_logits, static_argnames='sampling')
  kept = lambda logits, cfg, allowed=None: np.flatnonzero(np.isfinite(np.asarray(
      fn(jnp.asarray([logits], jnp.float32), cfg,
         None if allowed is None else jnp.asarray([allowed])))[0])).tolist()
  # top-k cuts through a three-way tie: the lower ids win.
  assert kept([0., 5., 5., 5., 1.], S.Sampling(top_k=2)) == [1, 2]
  assert kept([5., 5., 5., 9., 1.], S.Sampling(top_k=3)) == [0, 1, 3]
  # Four equal allowed logits (probability exactly 0.25 each): top_p lands on 0.5 exactly.
  logits, allowed = [7., 1., 1., 1., 1., 3.], [False, True, True, True, True, False]
  assert kept(logits, S.Sampling(top_p=0.5), allowed) == [1, 2]
  assert kept(logits, S.Sampling(top_p=0.501), allowed) == [1, 2, 3]
  assert kept(logits, S.Sampling(top_p=0.25), allowed) == [1]
  assert kept(logits, S.Sampling(top_p=0.1), allowed) == [1]
  assert kept(logits, S.Sampling(top_p=0.75), allowed) == [1, 2, 3]
  assert kept(logits, S.Sampling(top_p=1.0), allowed) == [1, 2, 3, 4]
  for p in (0.5, 0.501, 0.25, 0.75):  # and the numpy reference agrees
    ref, _, _ = np_filter(np.array([logits]), 1.0, 0, p, np.array([allowed]))
    assert np.flatnonzero(ref[0]).tolist() == kept(logits, S.Sampling(top_p=p), allowed)
  # top-p is computed after top-k: with k=2 the two kept share 0.5 each.
  assert kept([1., 1., 1., 1.], S.Sampling(top_k=2, top_p=0.6)) == [0, 1]
  assert kept([1., 1., 1., 1.], S.Sampling(top_k=2, top_p=0.5)) == [0]


# ---------------------------------------------------------------------------
# sample


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 1.0), (0.8, 4, 1.0),
                                                     (1.5, 0, 0.8), (0.7, 4, 0.9)])
def test_frequencies(temperature, top_k, top_p):
  N = 20000
  logits = np.array([2.0, 1.0, 0.5, 0.5, -1.0, 0.2], np.float32)
  allowed = np.array([True, True, True, True, True, False])
  cfg = S.Sampling(temperature, top_k, top_p)
  kept, x, _ = np_filter(logits[None], temperature, top_k, top_p, allowed[None])
  kept, x = kept[0], x[0]
  p = np.where(kept, np.exp(x - x[kept].max()), 0.0)
  p /= p.sum()
  fn = jax.jit(S.sample, static_argnames='sampling')
  draws = np.asarray(fn(jax.random.key(3), jnp.broadcast_to(logits, (N, 6)), cfg,
                        jnp.broadcast_to(allowed, (N, 6))))
  assert draws.dtype == np.int32
  freq = np.bincount(draws, minlength=6) / N
  assert np.all(freq[~kept] == 0), (freq, kept)
  se = np.sqrt(p * (1 - p) / N)
  assert np.all(np.abs(freq - p) <= 4 * se + 1e-9), (freq, p)
  assert kept.sum() >= 2  # a real distribution, not a constant


def test_seeded_and_greedy():
  rng = np.random.default_rng(0)
  B, V = 64, 50
  logits = jnp.asarray(rng.normal(size=(B, V)), jnp.float32)
  fn = jax.jit(S.sample, static_argnames='sampling')
  cfg = S.Sampling(temperature=1.0, top_k=20, top_p=0.95)
  a = np.asarray(fn(jax.random.key(1), logits, cfg))
  b = np.asarray(fn(jax.random.key(1), logits, cfg))
  c = np.asarray(fn(jax.random.key(2), logits, cfg))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # Greedy: argmax of the masked logits, the lowest id on ties, whatever the key.
  tied = np.round(rng.normal(size=(B, V))).astype(np.float32)
  allowed = rng.random((B, V)) < 0.5
  allowed[:, 0] = True
  want = np.argmax(np.where(allowed, tied, -np.inf), axis=-1)
  for key in (1, 2):
    got = fn(jax.random.key(key), jnp.asarray(tied), S.Sampling(temperature=0.0, top_k=3),
             jnp.asarray(allowed))
    np.testing.assert_array_equal(np.asarray(got), want)
  assert (np.asarray(S.sample(jax.random.key(0), jnp.asarray(tied), S.Sampling(0.0)))
          == np.argmax(tied, -1)).all()


# ---------------------------------------------------------------------------
# Grammar

N_IMG, N_CODES, VOCAB = 4, 8, 300
GRAMMAR = S.Grammar(num_image_tokens=N_IMG, num_image_codes=N_CODES)


def test_validator_catches_violations():
  good = [tok.BOS, 10, tok.BOI] + [tok.IMAGE_OFFSET + 1] * N_IMG + [tok.EOI, tok.EOS, 0]
  assert np_validate(good, N_IMG, N_CODES)[-4:] == [N_IMG, -1, -2, -2]
  bad = [good[:4] + [tok.EOI],  # image cut short
         good[:3] + [tok.IMAGE_OFFSET + N_CODES],  # code out of range
         good[:7] + [tok.IMAGE_OFFSET],  # one code too many
         good[:2] + [tok.EOI], good[:2] + [tok.BOS], good[:2] + [5],  # stray specials
         good[:2] + [tok.EOS, 9], good[:-1] + [tok.EOS]]  # anything but PAD after EOS
  for seq in bad:
    with pytest.raises(AssertionError):
      np_validate(seq, N_IMG, N_CODES)


def test_prompt_state_matches_validator():
  rng = np.random.default_rng(1)
  tokens, lengths = random_prefixes(rng, 400, N_IMG, N_CODES)
  past = np.arange(tokens.shape[1]) >= lengths[:, None]  # junk that would move the state
  tokens[past] = rng.choice([tok.BOI, tok.EOI, tok.EOS, tok.IMAGE_OFFSET], past.sum())
  got = np.asarray(jax.jit(GRAMMAR.prompt_state)(tokens, lengths))
  want = [np_validate(t[:n], N_IMG, N_CODES)[-1] for t, n in zip(tokens, lengths)]
  np.testing.assert_array_equal(got, want)
  assert set(want) == {-2, -1, 0, 1, 2, 3, 4}  # every kind of state covered
  assert GRAMMAR.prompt_state(tokens[:2], np.zeros(2, np.int32)).tolist() == [-1, -1]


@functools.partial(jax.jit, static_argnames=('cfg', 'steps'))
def _generate(key, prompt, lengths, cfg, steps):
  bias = jnp.zeros(VOCAB).at[jnp.array([tok.EOS, tok.BOI, tok.EOI, tok.PAD, tok.BOS, 5])].set(
      4.0).at[tok.IMAGE_OFFSET:].add(1.5)  # tempt the sampler toward specials and codes

  def step(state, key):
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (prompt.shape[0], VOCAB)) * 2 + bias
    token = S.sample(k2, logits, cfg, GRAMMAR.allowed(state, VOCAB))
    state = GRAMMAR.advance(state, token)
    return state, (token, state)

  state0 = GRAMMAR.prompt_state(prompt, lengths)
  _, (tokens, states) = jax.lax.scan(step, state0, jax.random.split(key, steps))
  return state0, tokens.T, states.T


@pytest.mark.parametrize('cfg', [S.Sampling(), S.Sampling(0.8, 5, 0.9), S.Sampling(0.0)])
def test_grammar_never_violated(cfg):
  rng = np.random.default_rng(2)
  B, steps = 256, 100
  prompt, lengths = random_prefixes(rng, B, N_IMG, N_CODES)
  state0, tokens, states = map(np.asarray, _generate(jax.random.key(5), prompt, lengths,
                                                     cfg, steps))
  assert set(state0.tolist()) >= {-2, -1, 0, 1, N_IMG}  # prompts end everywhere
  for b in range(B):
    seq = np.concatenate([prompt[b, :lengths[b]], tokens[b]])
    want = np_validate(seq, N_IMG, N_CODES)  # raises on any violation
    assert want[lengths[b] - 1] == state0[b]
    np.testing.assert_array_equal(states[b], want[lengths[b]:])
  # The run exercised the rules: images opened, completed and closed, rows finished.
  assert (tokens == tok.BOI).any() and (tokens == tok.EOI).any()
  assert (tokens >= tok.IMAGE_OFFSET).any() and (tokens == tok.EOS).any()
  assert (states[:, -1] == -2).mean() > 0.2


def test_advance_edges():
  adv = lambda state, token: GRAMMAR.advance(jnp.array(state), jnp.array(token)).tolist()
  code = tok.IMAGE_OFFSET
  assert adv([-1, -1, -1, 0, N_IMG - 1, N_IMG], [tok.BOI, 50, tok.EOS, code, code, tok.EOI]) \
      == [0, -1, -2, 1, N_IMG, -1]
  # Off-format tokens (not validated): finished stays finished, the count stops at N_IMG.
  assert adv([-2, -2, -2, N_IMG], [tok.BOI, code, tok.EOI, code]) == [-2, -2, -2, N_IMG]


def test_allowed_table():
  a = np.asarray(GRAMMAR.allowed(jnp.array([-1, 0, N_IMG - 1, N_IMG, -2]), VOCAB))
  ids = np.arange(VOCAB)
  text = (ids >= 8) & (ids < 264)
  np.testing.assert_array_equal(a[0], text | (ids == tok.BOI) | (ids == tok.EOS))
  np.testing.assert_array_equal(a[1], (ids >= 264) & (ids < 264 + N_CODES))
  np.testing.assert_array_equal(a[2], a[1])
  np.testing.assert_array_equal(a[3], ids == tok.EOI)
  np.testing.assert_array_equal(a[4], ids == tok.PAD)


# ---------------------------------------------------------------------------
# config errors


@pytest.mark.parametrize('kwargs,match', [
    ({'temperature': -0.1}, 'temperature'), ({'temperature': float('nan')}, 'temperature'),
    ({'top_k': -1}, 'top_k'), ({'top_p': 0.0}, 'top_p'), ({'top_p': 1.5}, 'top_p'),
    ({'top_p': -0.2}, 'top_p')])
def test_check_errors(kwargs, match):
  cfg = S.Sampling(**kwargs)
  with pytest.raises(ValueError, match=match) as e:
    cfg.check()
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=match):
    S.sample(jax.random.key(0), jnp.zeros((1, 4)), cfg)


def test_check_accepts_valid_and_grammar_errors():
  for cfg in (S.Sampling(), S.Sampling(0.0), S.Sampling(2.0, 1, 1.0), S.Sampling(1.0, 0, 1e-3)):
    cfg.check()
  with pytest.raises(ValueError, match='num_image_tokens'):
    S.Grammar(0, 8)
  with pytest.raises(ValueError, match='vocab_size'):
    GRAMMAR.allowed(jnp.array([-1]), tok.IMAGE_OFFSET + N_CODES - 1)
