"""IMP (arXiv 2305.06324, SPEC §4): modality embedders, ONE shared encoder and task heads,
for alternating-gradient multi-task training (projects/imp/schedules.py picks the task of a
step).

    image [B, H, W, C] -> ImageEmbed --+                  +-> ClassifierHead   -> logits [B, K]
                                       +-> Encoder (L x) -+-> ContrastiveHead  -> emb [B, P]
    text  [B, T]       -> TextEmbed  --+                  +-> CaptionHead      -> logits [B, T, V]

Design (choices of this file, not all from the paper):
  * Positions are FIXED sin-cos embeddings added by the embedders; the encoder has no RoPE.
    Images: the 2-D table of big_vision's `posemb_sincos_2d`, computed for the grid of the
    input, so the same weights serve any resolution divisible by the patch size. With
    `posemb_grid=0` a patch's coordinates are its (row, col) patch indices (a 16x16 image
    looks like the top-left quarter of a 32x32 one); with `posemb_grid=g` they are rescaled
    so that every resolution spans the same [0, g) range (patch centres (i + 0.5) g / n - 0.5).
    Text: the 1-D table with the same frequencies, positions 0..T-1, also in captioning.
  * Masks (bool [B, T, T], query x key): encoding is bidirectional with a key-padding mask
    (`padding_mask`); captioning runs the encoder as a prefix LM over [image | text]
    (`prefix_lm_mask`): image tokens see all image tokens, text token t sees the image and
    text tokens <= t.
  * Pooling: mean over the valid tokens of the final-normed encoder output, in float32.
  * Each head owns its parameters (and `log_temp` is its own top-level Param), so a task's
    loss reaches only `TASK_MODULES[kind]`; the trainer masks updates to those.
  * MoE: `MoELayer` FFNs in the LAST `moe_last` blocks (IMP: expert choice, capacity 1.0,
    QK-norm on). Every token is routed, text padding included (pads can take expert slots;
    Text padding is not routed: the encoder passes the valid tokens as MoELayer's
    `token_mask_BT`, so pads take no expert slot and the router metrics and z-loss average
    over real tokens only. Expert-choice routing looks at the whole routing
    group, so under MoE the caption task is NOT strictly causal (a text token's routing
    depends on later tokens); the dense encoder is.

Every method returns `(out, aux)`; aux holds the MoE layers' router metrics per layer
(`layer_{i}/aux_loss`, ...); projects/imp/losses.py's `task_loss` adds the aux losses to
the task loss. The model registers itself as `model.family='imp'` with training/state.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core import layers, partitioning
from core.partitioning import constrain
from data import tokenizer
from moe import layer as moe_layer, routing
from training import state as state_lib

dtype_of = layers.dtype_of

LOG_TEMP_INIT = math.log(1 / 0.07)  # CLIP's initial logit scale 1/0.07
LOG_TEMP_MAX = math.log(100.0)  # CLIP clamps the logit scale at 100
POSEMB_TEMPERATURE = 10_000.0


@dataclasses.dataclass(frozen=True)
class IMPSpec:
  """IMP model hyper-parameters."""
  embed_dim: int  # D (divisible by 4, >= 8: the 2-D sin-cos table has 4 blocks)
  num_layers: int  # L encoder blocks
  num_heads: int  # H
  head_dim: int  # K
  mlp_dim: int  # F of the dense SwiGLU FFNs
  classifiers: tuple[tuple[str, int], ...]  # (head name, classes) per classifier head
  patch_size: int = 4  # image patches are patch_size x patch_size pixels
  num_channels: int = 3  # C of the images
  vocab_size: int = tokenizer.VOCAB_SIZE  # V (text embedding and caption logits)
  max_text_len: int = 64  # longest text sequence accepted
  proj_dim: int = 64  # width of the contrastive embeddings
  moe: moe_layer.MoESpec | None = None  # MoE FFN settings (None = dense encoder)
  moe_last: int = 0  # the last `moe_last` blocks use `moe` as their FFN
  qk_norm: bool = True  # RMSNorm of queries and keys over the head dim (IMP)
  attn_gate: str = 'none'  # core/layers.py ATTN_GATES: sigmoid gate on the attention output
  posemb_grid: int = 0  # 0: patch-index coordinates; g: rescaled to a g x g grid
  attention_impl: str | None = None  # jax.nn.dot_product_attention implementation
  remat: bool = False  # rematerialise each block in the backward pass
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'


def check_spec(spec: IMPSpec) -> None:
  """Raises a ValueError naming the first problem of `spec` (before any compilation)."""
  for name in ('embed_dim', 'num_layers', 'num_heads', 'head_dim', 'mlp_dim', 'patch_size',
                'num_channels', 'vocab_size', 'max_text_len', 'proj_dim'):
    v = getattr(spec, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f'IMPSpec.{name} must be an int >= 1, got {v!r}')
  if spec.embed_dim % 4 or spec.embed_dim < 8:
    raise ValueError(f'IMPSpec.embed_dim={spec.embed_dim} must be a multiple of 4 and >= 8 '
                     '(the 2-D sin-cos position table has 4 blocks of >= 2 frequencies)')
  heads = spec.classifiers
  ok = (isinstance(heads, tuple) and heads
        and all(isinstance(h, tuple) and len(h) == 2 for h in heads))
  if ok:
    names = [n for n, _ in heads]
    ok = len(set(names)) == len(names) and all(
        isinstance(n, str) and n.isidentifier() and isinstance(k, int)
        and not isinstance(k, bool) and k >= 2 for n, k in heads)
  if not ok:
    raise ValueError(f'IMPSpec.classifiers={spec.classifiers!r} must be a non-empty tuple of '
                     '(head name: a unique identifier, number of classes >= 2)')
  if spec.attn_gate not in layers.ATTN_GATES:
    raise ValueError(f'IMPSpec.attn_gate={spec.attn_gate!r} is not one of {layers.ATTN_GATES}')
  if spec.posemb_grid < 0:
    raise ValueError(f'IMPSpec.posemb_grid={spec.posemb_grid} must be >= 0 (0 = patch '
                     'indices)')
  if not 0 <= spec.moe_last <= spec.num_layers:
    raise ValueError(f'IMPSpec.moe_last={spec.moe_last} must be in [0, num_layers='
                     f'{spec.num_layers}]')
  if spec.moe is None and spec.moe_last:
    raise ValueError(f'IMPSpec.moe_last={spec.moe_last} needs IMPSpec.moe (an MoESpec)')
  if spec.moe is not None:
    if not spec.moe_last:
      raise ValueError('IMPSpec.moe is set but moe_last=0: no block would use it')
    # Sequence lengths vary by task and resolution: group_size is checked against the
    # actual shapes by MoELayer (0 = one sequence per group works for every task).
    moe_layer.check_moe_spec(spec.moe, seq_len=max(spec.moe.group_size, 1), expert_shards=1)
  dtype_of(spec.dtype)
  dtype_of(spec.param_dtype)


def spec_from_config(model_cfg, *, param_dtype: str, compute_dtype: str) -> IMPSpec:
  """`config.model` (configs/imp.py: shared sizes + `model.imp`) -> IMPSpec. The MoE FFNs
  use capacity dispatch (expert choice caps each expert itself)."""
  m = model_cfg.imp
  moe = None
  if m.moe_last:
    e = m.moe
    router = routing.RouterConfig(
        name=e.router, capacity_factor=e.capacity_factor, jitter=e.jitter,
        load_balance_coef=e.load_balance_coef, z_loss_coef=e.z_loss_coef)
    moe = moe_layer.MoESpec(num_experts=e.num_experts, mlp_dim=e.mlp_dim, router=router,
                            dispatch='capacity', group_size=e.group_size)
  return IMPSpec(
      embed_dim=model_cfg.embed_dim, num_layers=model_cfg.num_layers,
      num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim, mlp_dim=model_cfg.mlp_dim,
      classifiers=tuple((str(k), v) for k, v in m.classifiers.items()),
      patch_size=m.patch_size, vocab_size=model_cfg.vocab_size,
      max_text_len=m.max_text_len, proj_dim=m.proj_dim, moe=moe, moe_last=m.moe_last,
      qk_norm=m.qk_norm, attn_gate=model_cfg.attn_gate, posemb_grid=m.get('posemb_grid', 0),
      attention_impl=model_cfg.attention_impl or None, remat=model_cfg.remat,
      dtype=compute_dtype, param_dtype=param_dtype)


# ---------------------------------------------------------------------------
# Fixed sin-cos position tables (numpy, static shapes: constants of the compiled program).


def _omega(n: int) -> np.ndarray:
  """n frequencies 1 / 10000 ** (i / (n - 1)), i = 0..n-1 (big_vision)."""
  return 1.0 / POSEMB_TEMPERATURE ** (np.arange(n, dtype=np.float64) / max(n - 1, 1))


def posemb_sincos_1d(length: int, width: int) -> np.ndarray:
  """[length, width] float32: [sin(t w_i), cos(t w_i)], w = _omega(width // 2)."""
  ang = np.arange(length, dtype=np.float64)[:, None] * _omega(width // 2)
  return np.concatenate([np.sin(ang), np.cos(ang)], axis=1).astype(np.float32)


def posemb_sincos_2d(h: int, w: int, width: int, grid: int = 0) -> np.ndarray:
  """[h * w, width] float32 in raster order: [sin(x w_i), cos(x w_i), sin(y w_i), cos(y w_i)]
  with w = _omega(width // 4), (y, x) the patch's row and column index, or with `grid` > 0
  its centre rescaled to a grid x grid layout: (i + 0.5) * grid / n - 0.5."""
  y, x = np.mgrid[:h, :w].astype(np.float64)
  if grid:
    y, x = (y + 0.5) * grid / h - 0.5, (x + 0.5) * grid / w - 0.5
  omega = _omega(width // 4)
  ax, ay = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
  pe = np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], axis=1)
  return pe.astype(np.float32)


# ---------------------------------------------------------------------------
# Masks (bool, query x key).


def padding_mask(valid_BT: jax.Array) -> jax.Array:
  """Bidirectional attention over the valid keys: [B, T, T]. Every sequence needs >= 1 valid
  token (a fully masked row would be NaN)."""
  B, T = valid_BT.shape
  return jnp.broadcast_to(valid_BT.astype(jnp.bool_)[:, None, :], (B, T, T))


def prefix_lm_mask(prefix_len: int, text_valid_BT: jax.Array) -> jax.Array:
  """[B, N+T, N+T] over [prefix (N) | text (T)]: key k is visible from query q iff k < N or
  (k <= q and k is valid text). Image queries thus see exactly the prefix."""
  B, T = text_valid_BT.shape
  n = prefix_len + T
  q, k = np.arange(n)[:, None], np.arange(n)[None, :]
  base = jnp.asarray((k < prefix_len) | (k <= q))
  valid = jnp.concatenate([jnp.ones((B, prefix_len), jnp.bool_),
                           text_valid_BT.astype(jnp.bool_)], axis=1)
  return base[None] & valid[:, None, :]


def masked_mean(x_BTD: jax.Array, valid_BT: jax.Array | None) -> jax.Array:
  """Mean over the valid tokens, float32 [B, D] (all tokens when `valid_BT` is None)."""
  x = x_BTD.astype(jnp.float32)
  if valid_BT is None:
    return x.mean(axis=1)
  m = valid_BT.astype(jnp.float32)[..., None]
  return (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def normalize_images(images_uint8) -> jax.Array:
  """uint8 pixels -> float32 in [-1, 1], the input range the embedder is initialised for."""
  return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------
# Embedders.


class ImageEmbed(nnx.Module):
  """[B, H, W, C] -> patches (flattened in (row, col, channel) order) -> linear -> + 2-D
  sin-cos table of the (H/P) x (W/P) grid: tokens [B, H W / P^2, D] in raster order."""

  def __init__(self, spec: IMPSpec, *, rngs: nnx.Rngs):
    P, C, D = spec.patch_size, spec.num_channels, spec.embed_dim
    pdtype = dtype_of(spec.param_dtype)
    self.patch_size = P  # pixels per patch side
    self.num_channels = C
    self.posemb_grid = spec.posemb_grid  # see posemb_sincos_2d
    self.dtype = dtype_of(spec.dtype)  # compute dtype
    self.kernel = partitioning.param(rngs, partitioning.fan_in_init(P * P * C), (P * P * C, D),
                               (None, 'embed'), pdtype)
    self.bias = partitioning.param(rngs, nnx.initializers.zeros, (D,), ('embed',), pdtype)

  def __call__(self, images_BHWC: jax.Array) -> jax.Array:
    B, H, W, C = images_BHWC.shape
    P = self.patch_size
    if H % P or W % P or C != self.num_channels:
      raise ValueError(f'images of shape {images_BHWC.shape}: need [B, H, W, '
                       f'{self.num_channels}] with H and W divisible by patch_size={P}')
    gh, gw = H // P, W // P
    x = images_BHWC.astype(self.dtype).reshape(B, gh, P, gw, P, C)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(B * gh * gw, P * P * C)
    x = x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
    pe = posemb_sincos_2d(gh, gw, x.shape[-1], self.posemb_grid)
    x = x.reshape(B, gh * gw, -1) + jnp.asarray(pe, self.dtype)
    return constrain(x, ('batch', 'length', 'act_embed'))


class TextEmbed(nnx.Module):
  """tokens [B, T] -> table lookup (layers.Embed) + 1-D sin-cos table: [B, T, D]."""

  def __init__(self, spec: IMPSpec, *, rngs: nnx.Rngs):
    self.max_len = spec.max_text_len  # longest sequence accepted
    self.dtype = dtype_of(spec.dtype)
    self.embed = layers.Embed(vocab_size=spec.vocab_size, embed_dim=spec.embed_dim,
                              dtype=self.dtype, param_dtype=dtype_of(spec.param_dtype),
                              rngs=rngs)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    T = tokens_BT.shape[1]
    if T > self.max_len:
      raise ValueError(f'text length {T} > IMPSpec.max_text_len={self.max_len}')
    x = self.embed(tokens_BT)
    pe = posemb_sincos_1d(T, x.shape[-1])
    return constrain(x + jnp.asarray(pe, self.dtype), ('batch', 'length', 'act_embed'))


# ---------------------------------------------------------------------------
# The shared encoder.


class EncoderAttention(nnx.Module):
  """Multi-head attention under an explicit mask (no causal default, no RoPE), optional
  QK-norm and output gate (`attn_gate`: SDPA * sigmoid(x W_g) before W_O, docs/gates.md)."""

  def __init__(self, spec: IMPSpec, *, rngs: nnx.Rngs):
    D, H, K = spec.embed_dim, spec.num_heads, spec.head_dim
    pdtype = dtype_of(spec.param_dtype)
    self.dtype = dtype_of(spec.dtype)  # compute dtype
    self.implementation = spec.attention_impl  # for jax.nn.dot_product_attention
    init = partitioning.fan_in_init(D)
    qkv_axes = ('embed', 'heads', 'head_dim')
    self.wq = partitioning.param(rngs, init, (D, H, K), qkv_axes, pdtype)
    self.wk = partitioning.param(rngs, init, (D, H, K), qkv_axes, pdtype)
    self.wv = partitioning.param(rngs, init, (D, H, K), qkv_axes, pdtype)
    self.wo = partitioning.param(rngs, partitioning.fan_in_init(H * K), (H, K, D),
                           ('heads', 'head_dim', 'embed'), pdtype)
    self.q_norm = layers.RMSNorm(K, param_dtype=pdtype, rngs=rngs) if spec.qk_norm else None
    self.k_norm = layers.RMSNorm(K, param_dtype=pdtype, rngs=rngs) if spec.qk_norm else None
    g_shape, g_axes = layers.gate_shape(spec.attn_gate, H, K)  # W_g: gated only
    self.wg = (partitioning.param(rngs, init, (D,) + g_shape, ('embed',) + g_axes, pdtype)
               if g_shape else None)
    # eval only (projects/imp/evaluate.py `attention_stats`): sow each query's sink share
    self.attention_stats = False

  def __call__(self, x_BTD: jax.Array, mask_BTT: jax.Array) -> jax.Array:
    """`mask_BTT` (bool, query x key): every query must keep at least one key."""
    B, T, D = x_BTD.shape
    x = x_BTD.astype(self.dtype).reshape(B * T, D)

    def project(w):  # [D, H, K] -> [B, T, H, K]; W_g [D, H] -> [B, T, H, 1]
      w = w[...].astype(self.dtype)
      return (x @ w.reshape(D, -1)).reshape(B, T, w.shape[1], -1)
    q, k, v = project(self.wq), project(self.wk), project(self.wv)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    heads = ('batch', 'length', 'act_heads', None)
    q, k, v = constrain(q, heads), constrain(k, heads), constrain(v, heads)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask_BTT[:, None],
                                     implementation=self.implementation)
    if self.attention_stats:  # static: training never computes this
      self.sow(nnx.Intermediate, 'sink', layers.sink_share(q, k, mask_BTT, causal=False),
               capture_noop=True)
    if self.wg is not None:
      o = layers.apply_gate(o, constrain(project(self.wg), heads))
    o = constrain(o, heads)
    out = o.reshape(B * T, -1) @ self.wo[...].astype(self.dtype).reshape(-1, D)
    return constrain(out.reshape(B, T, D), ('batch', 'length', 'act_embed'))


class EncoderBlock(nnx.Module):
  """Pre-norm block: `h = x + Attn(Norm(x), mask)`, `y = h + FFN(Norm(h))`; the FFN is a
  SwiGLU, or a MoELayer when `use_moe`."""

  def __init__(self, spec: IMPSpec, *, use_moe: bool, rngs: nnx.Rngs):
    dtype, pdtype = dtype_of(spec.dtype), dtype_of(spec.param_dtype)
    self.use_moe = use_moe  # FFN = MoELayer(spec.moe)
    self.attn_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.attn = EncoderAttention(spec, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(spec.embed_dim, param_dtype=pdtype, rngs=rngs)
    if use_moe:
      self.ffn = moe_layer.MoELayer(spec.moe, embed_dim=spec.embed_dim, dtype=dtype,
                                    param_dtype=pdtype, rngs=rngs)
    else:
      self.ffn = layers.SwiGLU(embed_dim=spec.embed_dim, mlp_dim=spec.mlp_dim, dtype=dtype,
                               param_dtype=pdtype, rngs=rngs)

  def __call__(self, x_BTD, mask_BTT, rng=None, valid_BT=None):
    h = x_BTD + self.attn(self.attn_norm(x_BTD), mask_BTT)
    if self.use_moe:  # only valid tokens are routed (None: all)
      y, aux = self.ffn(self.ffn_norm(h), rng, valid_BT)
      return h + y, aux
    return h + self.ffn(self.ffn_norm(h)), {}


class Encoder(nnx.Module):
  """L EncoderBlocks + final RMSNorm; the last `moe_last` blocks are MoE blocks."""

  def __init__(self, spec: IMPSpec, *, rngs: nnx.Rngs):
    self.remat = spec.remat  # rematerialise each block in the backward pass
    first_moe = spec.num_layers - spec.moe_last
    self.blocks = nnx.List([EncoderBlock(spec, use_moe=spec.moe is not None and i >= first_moe,
                                         rngs=rngs) for i in range(spec.num_layers)])
    self.final_norm = layers.RMSNorm(spec.embed_dim, param_dtype=dtype_of(spec.param_dtype),
                                     rngs=rngs)
    self.attention_stats = False  # eval only (projects/imp/evaluate.py `attention_stats`)

  def __call__(self, x_BTD: jax.Array, mask_BTT: jax.Array, rng: jax.Array | None = None,
               valid_BT: jax.Array | None = None):
    """-> (y [B, T, D], aux); `rng` (training only) drives router jitter; `valid_BT` (bool,
    None = all) are the tokens the MoE layers route."""
    call = lambda b, x, m, r, v: b(x, m, r, v)
    if self.remat:
      call = nnx.remat(call)
    aux = {}
    for i, block in enumerate(self.blocks):
      block_rng = None if rng is None else jax.random.fold_in(rng, i)
      x_BTD, block_aux = call(block, x_BTD, mask_BTT, block_rng, valid_BT)
      aux.update({f'layer_{i}/{k}': v for k, v in block_aux.items()})
      if self.attention_stats:  # eval only: the residual stream's peak over valid tokens
        valid = 1.0 if valid_BT is None else valid_BT[..., None].astype(jnp.float32)
        peak = jnp.max(jnp.abs(x_BTD.astype(jnp.float32)) * valid)
        self.sow(nnx.Intermediate, 'peak', peak, capture_noop=True)
    return self.final_norm(x_BTD), aux


# ---------------------------------------------------------------------------
# Heads.


class ClassifierHead(nnx.Module):
  """Mean-pool over the valid tokens -> linear: float32 logits [B, num_classes]."""

  def __init__(self, spec: IMPSpec, num_classes: int, *, rngs: nnx.Rngs):
    pdtype = dtype_of(spec.param_dtype)
    self.kernel = partitioning.param(rngs, partitioning.fan_in_init(spec.embed_dim),
                               (spec.embed_dim, num_classes), ('embed', None), pdtype)
    self.bias = partitioning.param(rngs, nnx.initializers.zeros, (num_classes,), (None,), pdtype)

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
    pooled = masked_mean(x_BTD, valid_BT)
    return pooled @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class ContrastiveHead(nnx.Module):
  """Mean-pool over the valid tokens -> linear (no bias) -> L2 normalise: [B, proj_dim]."""

  def __init__(self, spec: IMPSpec, *, rngs: nnx.Rngs):
    self.kernel = partitioning.param(rngs, partitioning.fan_in_init(spec.embed_dim),
                               (spec.embed_dim, spec.proj_dim), ('embed', None),
                               dtype_of(spec.param_dtype))

  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None) -> jax.Array:
    z = masked_mean(x_BTD, valid_BT) @ self.kernel[...].astype(jnp.float32)
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)


class CaptionHead(nnx.Module):
  """LM head on the text positions: float32 logits [B, T, V]."""

  def __init__(self, spec: IMPSpec, *, rngs: nnx.Rngs):
    self.dtype = dtype_of(spec.dtype)
    self.kernel = partitioning.param(rngs, partitioning.fan_in_init(spec.embed_dim),
                               (spec.embed_dim, spec.vocab_size), ('embed', 'vocab'),
                               dtype_of(spec.param_dtype))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    B, T, D = x_BTD.shape
    logits = x_BTD.astype(self.dtype).reshape(B * T, D) @ self.kernel[...].astype(self.dtype)
    return constrain(logits.reshape(B, T, -1).astype(jnp.float32),
                     ('batch', 'length', 'act_vocab'))


# ---------------------------------------------------------------------------
# The model.


class IMPModel(nnx.Module):
  """Embedders + shared encoder + heads; one method per task, each `-> (out, aux)`.

  Images are float [B, H, W, C] (`normalize_images` for uint8), H and W divisible by
  patch_size; text is int32 tokens [B, T] with a bool validity mask [B, T].
  """

  def __init__(self, spec: IMPSpec, *, rngs: nnx.Rngs):
    check_spec(spec)
    self.spec = spec
    self.image_embed = ImageEmbed(spec, rngs=rngs)
    self.text_embed = TextEmbed(spec, rngs=rngs)
    self.encoder = Encoder(spec, rngs=rngs)
    # one classifier per head name (IMP: per dataset); classification tasks name theirs
    self.classifiers = nnx.Dict({name: ClassifierHead(spec, n, rngs=rngs)
                                 for name, n in spec.classifiers})
    self.image_proj = ContrastiveHead(spec, rngs=rngs)
    self.text_proj = ContrastiveHead(spec, rngs=rngs)
    # log of the contrastive logit scale (1 / temperature), float32 whatever param_dtype
    self.log_temp = partitioning.param(rngs, nnx.initializers.constant(LOG_TEMP_INIT), (), (),
                                 jnp.float32)
    self.caption_head = CaptionHead(spec, rngs=rngs)

  def encode_image(self, images_BHWC, rng=None):
    """-> (tokens [B, H W / P^2, D], aux): bidirectional over all patches."""
    x = self.image_embed(images_BHWC)
    B, N, _ = x.shape
    return self.encoder(x, jnp.ones((B, N, N), jnp.bool_), rng)

  def encode_text(self, tokens_BT, mask_BT, rng=None):
    """-> (tokens [B, T, D], aux): bidirectional over the valid tokens."""
    mask_BT = jnp.asarray(mask_BT, jnp.bool_)
    return self.encoder(self.text_embed(tokens_BT), padding_mask(mask_BT), rng, mask_BT)

  def classify(self, images_BHWC, rng=None, head: str | None = None):
    """-> (logits [B, classes of `head`] float32, aux). `head` may be left out when the
    model has one classifier."""
    if head is None:
      if len(self.spec.classifiers) != 1:
        raise ValueError(f'classify: name the head, one of {self.head_names()}')
      head = self.spec.classifiers[0][0]
    if head not in self.head_names():
      raise ValueError(f'classify: no classifier head {head!r}; heads: {self.head_names()}')
    x, aux = self.encode_image(images_BHWC, rng)
    return self.classifiers[head](x), aux

  def head_names(self) -> list[str]:
    return [name for name, _ in self.spec.classifiers]

  def embed_image(self, images_BHWC, rng=None):
    """-> (L2-normalised [B, proj_dim] float32, aux)."""
    x, aux = self.encode_image(images_BHWC, rng)
    return self.image_proj(x), aux

  def embed_text(self, tokens_BT, mask_BT, rng=None):
    """-> (L2-normalised [B, proj_dim] float32, aux); pooled over the valid tokens."""
    x, aux = self.encode_text(tokens_BT, mask_BT, rng)
    return self.text_proj(x, mask_BT), aux

  def caption_logits(self, images_BHWC, tokens_BT, mask_BT=None, rng=None):
    """Prefix LM over [image | text]: -> (logits [B, T, V] float32 at the text positions,
    aux); logits[:, t] predicts text token t + 1. `mask_BT` (default all valid) hides
    padded text keys."""
    img = self.image_embed(images_BHWC)
    txt = self.text_embed(tokens_BT)
    N = img.shape[1]
    if mask_BT is None:
      mask_BT = jnp.ones(tokens_BT.shape, jnp.bool_)
    x = jnp.concatenate([img, txt], axis=1)
    valid = jnp.concatenate([jnp.ones(img.shape[:2], jnp.bool_), mask_BT], axis=1)
    y, aux = self.encoder(x, prefix_lm_mask(N, mask_BT), rng, valid)
    return self.caption_head(y[:, N:]), aux


state_lib.register_model('imp', state_lib.ModelKind(
    spec=lambda config: spec_from_config(config.model, param_dtype=config.param_dtype,
                                         compute_dtype=config.compute_dtype),
    build=IMPModel))
