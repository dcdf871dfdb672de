"""Mixture-of-Transformers (Liang et al. 2024, arXiv 2411.04996): modality-untied blocks.

Every non-embedding weight of a block (Q, K, V, O, the FFN, the norms) can be untied by
modality: stacked on a leading 'modality' axis, each modality's tokens use only their own
slice. Attention stays ONE global causal attention over the mixed sequence:

    per-modality projections as ONE grouped matmul (rows placed by a counting sort on the
    modality id, computed, and gathered back) -> RoPE, global causal attention over the
    original order -> grouped W_O
    h = x + Norm_m(Attn(x))            (res_post, the paper's form; `pre`: x + Attn(Norm_m(x)))
    y = h + Norm_m(FFN_m(h))           FFN_m = grouped SwiGLU over the sorted rows

No router, no aux loss, no dropped tokens. The grouped matmuls (moe/grouped.py:
`ragged_dot` on TPU, padded blocks on GPU, a few chunk GEMMs per modality on CPU) keep the
FLOPs per token at the dense model's. Without a MoE the residual stream itself stays in
that modality-sorted row layout from the first block to the last (`stream_in` /
`stream_out`, called by the Decoder): per layer, rows move only around the global
attention (q/k/v gathered to the original order, o gathered back), and both directions
are gathers.

Parallelism: the untied projections run per batch shard inside `jax.shard_map` (each device
sorts only its own rows, so data parallelism is kept), with Megatron-style collectives for
the weights: all_gather over 'fsdp' of the embed axis, column-parallel Q/K/V and gate/up
over 'tensor' (heads / mlp), row-parallel O and down with a psum over 'tensor'. The
shard_map is manual only over the mesh axes of size > 1 (a collective over a size-1 axis is
still a copy). Tied parts with a MoE are plain matmuls under jit's automatic sharding, as
in core/layers.py. The 'modality' axis of the weights is replicated (every device holds
tokens of every modality).

`untie` picks the untied parts (the paper's ablation): 'ffn', 'attn' (Q, K, V, O, the
optional QK-norm scales and the attention gate W_g), 'norm' (the sub-layer norms); tied parts
are ordinary weights. The gate (`model.attn_gate`, docs/gates.md) is one more column block
of the grouped Q/K/V matmul: each token's gate logits come from its own modality's W_g.
MoT + MoE: `moe_modality`'s FFN is a routed `moe.layer.MoELayer` (the paper's best text
result: MoT with a text MoE-4x); its tokens are the only valid tokens of that layer's
routing, and they sort last so the untied FFN skips them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from core import layers
from core import partitioning
from core.partitioning import constrain, gather_fsdp, per_shard, psum_tensor
from data import tokenizer
from models import family as family_lib, moe_ffn
from moe import grouped, layer as moe_layer, rows

UNTIE = ('ffn', 'attn', 'norm')
# Rows per block of the grouped layout: with M (small) groups the padding is under
# M * BLOCK rows per shard. On CPU 256 beat 128 and 512 at tiny's D = 128
# (benchmarks/train_step.py, docs/mot.md).
BLOCK = 256
NORMS = ('res_post', 'pre')


@dataclasses.dataclass(frozen=True)
class MoTSpec:
  untie: frozenset  # subset of UNTIE
  num_modalities: int  # M
  qk_norm: bool = False  # RMSNorm of q and k over the head dim (per modality if attn untied)
  norm: str = 'res_post'
  moe_modality: int | None = None  # this modality's FFN is a MoE (`moe`)
  moe: moe_layer.MoESpec | None = None
  grouped_impl: str = 'auto'  # moe/grouped.py kernel


def check_spec(spec: MoTSpec) -> None:
  bad = set(spec.untie) - set(UNTIE)
  if bad:
    raise ValueError(f'model.mot.untie names {sorted(bad)}; choose from {UNTIE} or "all"')
  if spec.norm not in NORMS:
    raise ValueError(f'model.mot.norm={spec.norm!r} is not one of {NORMS}')
  if spec.moe_modality is not None and not 0 <= spec.moe_modality < spec.num_modalities:
    raise ValueError(f'model.mot.moe_modality={spec.moe_modality} is not a modality id')


def row_groups(modality_BT: jax.Array, groups: tuple[int, ...]) -> jax.Array:
  """int32 [B*T]: each row's group, `groups[m]` for modality m (-1 = none -> len(groups))."""
  num_groups = max(groups) + 1
  table = jnp.asarray([g if g >= 0 else num_groups for g in groups], jnp.int32)
  return table[modality_BT.reshape(-1)]


class Norm(nnx.Module):
  """RMSNorm with one scale per modality (untied) or one shared scale."""

  def __init__(self, dim: int, *, untied: int, param_dtype, rngs: nnx.Rngs, eps=1e-6):
    self.eps = eps
    shape, axes = ((untied, dim), ('modality', 'norm')) if untied else ((dim,), ('norm',))
    self.scale = partitioning.param(rngs, nnx.initializers.ones, shape, axes, param_dtype)

  def __call__(self, x: jax.Array, modality: jax.Array) -> jax.Array:
    y = layers.rms_normalize(x, self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if scale.ndim == 2:  # each token's own modality's scale: [B, T, (1, ...) dim]
      extra = (1,) * (x.ndim - modality.ndim - 1)
      scale = scale[modality].reshape(modality.shape + extra + scale.shape[-1:])
    return (y * scale).astype(x.dtype)


def _weight(rngs, fan_in, shape, axes, untied, pdtype):
  if untied:
    shape, axes = (untied,) + tuple(shape), ('modality',) + tuple(axes)
  return partitioning.param(rngs, partitioning.fan_in_init(fan_in), shape, axes, pdtype)


W_Q = ('modality', 'embed', 'heads', 'head_dim')
W_KV = ('modality', 'embed', 'kv_heads', 'head_dim')
W_O = ('modality', 'heads', 'head_dim', 'embed')
HEADS = ('batch', 'length', 'act_heads', None)  # q, o and the gate logits [B, T, H, 1|K]
W_IN = ('modality', 'embed', 'mlp')
W_OUT = ('modality', 'mlp', 'embed')
X = ('batch', 'length', 'act_embed')
STREAM = ('batch', 'act_embed')  # the residual stream in the rows layout (`stream_in`)
MOD = ('batch', 'length')


class MoTBlock(nnx.Module):
  """One MoT layer; `__call__(x, sin_cos, rng, *, modality) -> (y, aux)`."""

  def __init__(self, decoder_spec, *, rngs: nnx.Rngs):
    s, m = decoder_spec, decoder_spec.mot
    self.spec = m
    self.dtype = layers.dtype_of(s.dtype)
    pdtype = layers.dtype_of(s.param_dtype)
    M, D, H, G, K, F = (m.num_modalities, s.embed_dim, s.num_heads, s.num_kv_heads,
                        s.head_dim, s.mlp_dim)
    self.attn_impl = s.attention_impl
    ua = M if 'attn' in m.untie else 0
    un = M if 'norm' in m.untie else 0
    self.attn_norm = Norm(D, untied=un, param_dtype=pdtype, rngs=rngs)
    self.ffn_norm = Norm(D, untied=un, param_dtype=pdtype, rngs=rngs)
    self.wq = _weight(rngs, D, (D, H, K), W_Q[1:], ua, pdtype)
    self.wk = _weight(rngs, D, (D, G, K), W_KV[1:], ua, pdtype)
    self.wv = _weight(rngs, D, (D, G, K), W_KV[1:], ua, pdtype)
    self.wo = _weight(rngs, H * K, (H, K, D), W_O[1:], ua, pdtype)
    self.q_norm = Norm(K, untied=ua, param_dtype=pdtype, rngs=rngs) if m.qk_norm else None
    self.k_norm = Norm(K, untied=ua, param_dtype=pdtype, rngs=rngs) if m.qk_norm else None
    moe_m = m.moe_modality
    # FFN groups: untied = one per modality but the MoE one; tied = 2-D weights, and with a
    # MoE one group of all the other modalities' rows.
    uf = (M - (moe_m is not None)) if 'ffn' in m.untie else 0
    others = [i for i in range(M) if i != moe_m]
    if 'ffn' in m.untie:
      self.ffn_groups = tuple(others.index(i) if i != moe_m else -1 for i in range(M))
    else:
      self.ffn_groups = tuple(0 if i != moe_m else -1 for i in range(M))
    self.moe = (moe_layer.MoELayer(m.moe, embed_dim=D, dtype=self.dtype, param_dtype=pdtype,
                                   rngs=rngs) if moe_m is not None else None)
    self.w_gate = _weight(rngs, D, (D, F), W_IN[1:], uf, pdtype)
    self.w_up = _weight(rngs, D, (D, F), W_IN[1:], uf, pdtype)
    self.w_down = _weight(rngs, F, (F, D), W_OUT[1:], uf, pdtype)
    # The attention gate W_g [(M,) D, H(, K)], untied with W_Q (created last: an ungated
    # block's parameters and their initial values are those of before the gate existed).
    g_shape, g_axes = layers.gate_shape(s.attn_gate, H, K)
    self.wg = (_weight(rngs, D, (D,) + g_shape, ('embed',) + g_axes, ua, pdtype)
               if g_shape else None)
    self.w_g_names = ('modality', 'embed') + g_axes  # logical axes of the untied W_g
    # eval only (Decoder(attention_stats=True)): sow each query's sink share
    self.attention_stats = False

  def _w(self, w):
    return w[...].astype(self.dtype)

  def _attention(self, x_BTD, sin_cos, modality, attend=None):
    """Untied Q/K/V, `attend(q, k, v) -> o` (default: the global causal attention of the
    full pass), untied W_O."""
    B, T, D = x_BTD.shape
    x = x_BTD.astype(self.dtype)
    wq, wk, wv, wo = (self._w(w) for w in (self.wq, self.wk, self.wv, self.wo))
    ws = (wq, wk, wv) + (() if self.wg is None else (self._w(self.wg),))
    impl, groups = self.spec.grouped_impl, tuple(range(self.spec.num_modalities))
    g = None
    if wq.ndim == 3:  # tied: plain matmuls (automatic sharding)
      proj = lambda w: (x.reshape(B * T, D) @ w.reshape(D, -1)).reshape(B, T, w.shape[1], -1)
      q, k, v, *g = (proj(w) for w in ws)
      g = constrain(g[0], HEADS) if g else None
    else:
      def qkv_local(x, mod, *ws, collectives):
        y = grouped.grouped_matmul_rows(x.reshape(-1, x.shape[-1]),
                                        self._qkv_weight(ws, collectives),
                                        row_groups(mod, groups), impl=impl, block=BLOCK)
        return self._split_qkv(y, mod.shape, ws)
      kv = ('batch', 'length', 'act_kv_heads', None)
      names = (W_Q, W_KV, W_KV) + (() if self.wg is None else (self.w_g_names,))
      q, k, v, *g = per_shard(qkv_local, (X, MOD) + names, (HEADS, kv, kv) + (HEADS,) * (
          len(ws) - 3))(x, modality, *ws)
      g = g[0] if g else None
    o = (attend or (lambda q, k, v: self._global_attention(q, k, v, sin_cos, modality)))(
        q, k, v)
    if g is not None:
      o = layers.apply_gate(o, g)
    if wo.ndim == 3:
      out = (o.reshape(B * T, -1) @ wo.reshape(-1, D)).reshape(B, T, D)
    else:
      def out_local(o, mod, wo, collectives):
        wo = gather_fsdp(wo, 3, collectives)
        y = grouped.grouped_matmul_rows(o.reshape(-1, o.shape[2] * o.shape[3]),
                                        wo.reshape(wo.shape[0], -1, wo.shape[3]),
                                        row_groups(mod, groups), impl=impl, block=BLOCK)
        return psum_tensor(y.reshape(*mod.shape, -1), collectives)
      out = per_shard(out_local, (('batch', 'length', 'act_heads', None), MOD, W_O), X)(
          o, modality, wo)
    return constrain(out, X)

  @staticmethod
  def _qkv_weight(ws, collectives):
    """[M, D, N] of one grouped matmul for Q, K, V (and W_g): each gathered over 'fsdp'
    and flattened after the embed axis, side by side."""
    ws = [gather_fsdp(w, 1, collectives) for w in ws]
    return jnp.concatenate([a.reshape(*a.shape[:2], -1) for a in ws], axis=2)

  @staticmethod
  def _split_qkv(y, lead, ws):
    """The grouped matmul's [rows, N] -> q [*lead, Hq, K], k, v [*lead, Hk, K] (and the
    gate logits [*lead, Hq, 1 or K]); `ws` the local weights (shapes only)."""
    hq, hk, K = ws[0].shape[2], ws[1].shape[2], ws[0].shape[3]
    n = (hq + 2 * hk) * K
    qkv = y[:, :n].reshape(*lead, hq + 2 * hk, K)
    out = [qkv[..., :hq, :], qkv[..., hq:hq + hk, :], qkv[..., hq + hk:, :]]
    if len(ws) > 3:
      out.append(y[:, n:].reshape(*lead, hq, -1))
    return tuple(out)

  def _rope_qk(self, q, k, v, sin_cos, modality):
    """(QK-norm,) RoPE."""
    if self.q_norm is not None:
      q, k = self.q_norm(q, modality), self.k_norm(k, modality)
    q = constrain(layers.apply_rope(q, sin_cos), ('batch', 'length', 'act_heads', None))
    k = constrain(layers.apply_rope(k, sin_cos), ('batch', 'length', 'act_kv_heads', None))
    return q, k, constrain(v, ('batch', 'length', 'act_kv_heads', None))

  def _global_attention(self, q, k, v, sin_cos, modality):
    """(QK-norm,) RoPE and the global causal attention over the original order."""
    q, k, v = self._rope_qk(q, k, v, sin_cos, modality)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attn_impl)
    if self.attention_stats:  # static: the training step never computes this
      self.sow(nnx.Intermediate, 'sink', layers.sink_share(q, k), capture_noop=True)
    return constrain(o, HEADS)

  def _ffn(self, x_BTD, modality, rng, decoding=False):
    aux = {}
    x = x_BTD.astype(self.dtype)
    w = [self._w(a) for a in (self.w_gate, self.w_up, self.w_down)]
    if w[0].ndim == 2 and self.moe is None:  # tied, dense
      B, T, D = x.shape
      x2 = x.reshape(B * T, D)
      y = ((jax.nn.silu(x2 @ w[0]) * (x2 @ w[1])) @ w[2]).reshape(B, T, D)
    else:  # grouped SwiGLU over each shard's rows (MoE-modality rows in no group)
      w = [a[None] if a.ndim == 2 else a for a in w]
      groups, impl = self.ffn_groups, self.spec.grouped_impl

      def ffn_local(x, mod, wg, wu, wd, collectives):
        wg, wu = gather_fsdp(wg, 1, collectives), gather_fsdp(wu, 1, collectives)
        wd = gather_fsdp(wd, 2, collectives)
        y = grouped.grouped_swiglu_rows(x.reshape(-1, x.shape[-1]), wg, wu, wd,
                                        row_groups(mod, groups), impl=impl, block=BLOCK)
        return psum_tensor(y.reshape(*mod.shape, -1), collectives)
      y = per_shard(ffn_local, (X, MOD, W_IN, W_IN, W_OUT), X)(x, modality, *w)
    if self.moe is not None:
      y_moe, aux = self.moe(x_BTD, rng, token_mask_BT=modality == self.spec.moe_modality,
                            decoding=decoding)
      y = y + y_moe.astype(y.dtype)
    return constrain(y.astype(x_BTD.dtype), X), aux

  def _layout_of(self, mod):
    """Each shard's row layout (rows grouped by modality), from its [B, T] modality ids."""
    return rows.rows_layout(mod.reshape(-1), self.spec.num_modalities,
                               impl=self.spec.grouped_impl, block=BLOCK)

  def stream_in(self, x_BTD, modality):
    """The residual stream as these blocks carry it: without a MoE, each shard's rows in
    the modality-sorted layout (`[shards * P, D]`, P = the shard's padded rows), so the
    rows move only around the global attention; with a MoE, x itself."""
    if self.moe is not None:
      return x_BTD

    def place(x, mod, collectives):
      del collectives
      return rows.to_layout(x.reshape(-1, x.shape[-1]), self._layout_of(mod))
    return per_shard(place, (X, MOD), STREAM)(x_BTD, modality)

  def stream_out(self, x, modality):
    """`stream_in` undone: [B, T, D] in the original order."""
    if self.moe is not None:
      return x

    def back(xs, mod, collectives):
      del collectives
      return rows.from_layout(xs, self._layout_of(mod)).reshape(*mod.shape, -1)
    return per_shard(back, (STREAM, MOD), X)(x, modality)

  def _sorted_block(self, xs, sin_cos, modality):
    """The whole block (no MoE) on the stream `xs` (each shard's rows in the modality-
    sorted kernel layout, `stream_in`): projections, norms and residual adds all on the
    sorted rows; rows move only around the global attention (q/k/v out, o in)."""
    dt, pre = self.dtype, self.spec.norm == 'pre'
    eps_a, eps_f = self.attn_norm.eps, self.ffn_norm.eps
    untied = lambda w, n: w if w.ndim == n + 1 else w[None]  # tied: one group
    wq, wk, wv, wo = (untied(self._w(w), 3) for w in (self.wq, self.wk, self.wv, self.wo))
    ws = (wq, wk, wv) + (() if self.wg is None else (
        untied(self._w(self.wg), len(self.w_g_names) - 1),))
    wg, wu, wd = (untied(self._w(w), 2) for w in (self.w_gate, self.w_up, self.w_down))
    sa, sf = (untied(n.scale[...], 1) for n in (self.attn_norm, self.ffn_norm))

    def norm(x_PD, scale, eps, lay):  # Norm_m in the layout: one scale per block's group
      y = layers.rms_normalize(x_PD, eps)
      s = scale.astype(jnp.float32)
      P, D = x_PD.shape
      if s.shape[0] == 1:
        y = y * s[0]
      else:
        y = (y.reshape(P // lay.block, lay.block, D) * s[lay.block_expert][:, None]).reshape(P, D)
      return y.astype(x_PD.dtype)

    def qkv_local(xs, mod, sa, *ws, collectives):
      lay = self._layout_of(mod)
      if pre:
        xs = norm(xs, sa, eps_a, lay)
      y = rows.layout_matmul(xs.astype(dt), self._qkv_weight(ws, collectives), lay)
      return self._split_qkv(rows.from_layout(y, lay), mod.shape, ws)

    heads = HEADS
    kv = ('batch', 'length', 'act_kv_heads', None)
    s_names = ('modality', 'norm')
    names = (W_Q, W_KV, W_KV) + (() if self.wg is None else (self.w_g_names,))
    q, k, v, *g = per_shard(qkv_local, (STREAM, MOD, s_names) + names,
                            (heads, kv, kv) + (heads,) * (len(ws) - 3))(
                                xs, modality, sa, *ws)
    o = self._global_attention(q, k, v, sin_cos, modality)
    if g:
      o = layers.apply_gate(o, g[0])

    def out_local(o, xs, mod, sa, sf, wo, wg, wu, wd, collectives):
      wo = gather_fsdp(wo, 3, collectives)
      wg, wu = gather_fsdp(wg, 1, collectives), gather_fsdp(wu, 1, collectives)
      wd = gather_fsdp(wd, 2, collectives)
      lay = self._layout_of(mod)
      os_ = rows.to_layout(o.reshape(-1, o.shape[2] * o.shape[3]), lay)
      a = psum_tensor(rows.layout_matmul(os_, wo.reshape(wo.shape[0], -1, wo.shape[3]),
                                         lay), collectives)
      ffn = lambda h: psum_tensor(rows.layout_swiglu(h.astype(dt), wg, wu, wd, lay),
                                  collectives)
      if pre:
        h = xs + a
        return h + ffn(norm(h, sf, eps_f, lay)).astype(h.dtype)
      h = xs + norm(a, sa, eps_a, lay)
      return h + norm(ffn(h).astype(h.dtype), sf, eps_f, lay)

    y = per_shard(out_local, (heads, STREAM, MOD, s_names, s_names, W_O, W_IN, W_IN, W_OUT),
                  STREAM)(o, xs, modality, sa, sf, wo, wg, wu, wd)
    return constrain(y, STREAM), {}

  def __call__(self, x_BTD, sin_cos, rng=None, *, modality, causal=False):
    """x: the residual stream, as `stream_in` returns it (the rows layout without a MoE)."""
    del causal  # no batch-dependent routing besides the MoE's token choice
    if self.moe is None:
      return self._sorted_block(x_BTD, sin_cos, modality)
    return self._unsorted_block(x_BTD, sin_cos, modality, rng)

  def _unsorted_block(self, x_BTD, sin_cos, modality, rng, attend=None, decoding=False):
    """The block on [B, T, D] in the original order (with a MoE; and decoding)."""
    if self.spec.norm == 'res_post':
      h = x_BTD + self.attn_norm(self._attention(x_BTD, sin_cos, modality, attend), modality)
      f, aux = self._ffn(h, modality, rng, decoding)
      return h + self.ffn_norm(f, modality), aux
    h = x_BTD + self._attention(self.attn_norm(x_BTD, modality), sin_cos, modality, attend)
    f, aux = self._ffn(self.ffn_norm(h, modality), modality, rng, decoding)
    return h + f, aux

  def init_cache(self, batch: int, max_len: int) -> dict:
    return layers.init_kv_cache(batch, max_len, self.wk.shape[-2], self.wk.shape[-1],
                                self.dtype)

  def decode(self, x_BSD, sin_cos, *, modality, cache, index):
    """The block on S new tokens at positions index[b] + s, each projected with its own
    modality's weights, keys and values cached (models/generate.py) -> (y, cache)."""
    new = {}

    def attend(q, k, v):
      q, k, v = self._rope_qk(q, k, v, sin_cos, modality)
      o, new['cache'] = layers.attend_cached(q, k, v, cache, index,
                                             implementation=self.attn_impl)
      return o
    y, _ = self._unsorted_block(x_BSD, sin_cos, modality, None, attend, decoding=True)
    return y, new['cache']


# ---------------------------------------------------------------------------
# The MoT family (models/family.py): config -> spec, parameters, checks.


def mot_spec_from_config(mot_cfg, grouped_impl: str = 'auto') -> MoTSpec:
  names = tokenizer.MODALITIES
  untie = frozenset(p.strip() for p in mot_cfg.untie.split(',') if p.strip())
  moe_modality = moe = None
  if mot_cfg.moe_modality:
    if mot_cfg.moe_modality not in names:
      raise ValueError(f'model.mot.moe_modality={mot_cfg.moe_modality!r} is not one of '
                       f'{names}')
    moe_modality, moe = names.index(mot_cfg.moe_modality), moe_ffn.moe_spec_from_config(
        mot_cfg.moe, grouped_impl)
  return MoTSpec(untie=untie, num_modalities=len(names), qk_norm=mot_cfg.qk_norm,
                 norm=mot_cfg.norm, moe_modality=moe_modality, moe=moe,
                 grouped_impl=grouped_impl)


def _layer_params(spec, layer: int, active: bool) -> float:
  """One MoT layer: untied parts count M times (once when `active`: a token uses its own
  modality's copy); a MoE modality's FFN counts k experts when active (averaged over the
  modalities, as for MoMa)."""
  del layer
  m, d = spec.mot, spec.embed_dim
  M = m.num_modalities
  h, g, k = spec.num_heads, spec.num_kv_heads, spec.head_dim
  copies = lambda part: 1 if active or part not in m.untie else M  # noqa: E731
  gate = layers.gate_params(spec.attn_gate, d, h, k)
  attn = (d * (h + 2 * g) * k + h * k * d + gate + (2 * k if m.qk_norm else 0)) * copies('attn')
  norms = 2 * d * copies('norm')
  ffn = 3 * d * spec.mlp_dim
  if m.moe is None:
    return attn + norms + ffn * copies('ffn')
  e = m.moe
  moe = 3 * d * e.mlp_dim * (e.router.k if active else e.num_experts) + d * e.num_experts
  if active:
    return attn + norms + ((M - 1) * ffn + moe) / M
  return attn + norms + ffn * ((M - 1) if 'ffn' in m.untie else 1) + moe


def _validate(config, sizes) -> None:
  spec = mot_spec_from_config(config.model.mot)
  check_spec(spec)
  if spec.moe is not None:
    moe_ffn.check_moe_block(config.model.mot.moe, 'model.mot.moe')
    moe_layer.check_moe_spec(spec.moe, seq_len=config.seq_len, expert_shards=sizes['expert'])


FAMILY = family_lib.Family(
    name='mot',
    spec_fields=lambda model_cfg, stage: {'mot': mot_spec_from_config(model_cfg.mot,
                                                                       model_cfg.grouped_impl)},
    block=lambda spec, layer, rngs: MoTBlock(spec, rngs=rngs),
    layer_params=_layer_params,
    validate=_validate,
    decode_unsupported=lambda spec: (None if spec.mot.moe is None else
                                     moe_ffn.decode_unsupported_moe(spec.mot.moe,
                                                                    'model.mot.moe')),
    stream_in=lambda decoder, x, modality: decoder.blocks[0].stream_in(x, modality),
    stream_out=lambda decoder, x, modality: decoder.blocks[0].stream_out(x, modality),
)
