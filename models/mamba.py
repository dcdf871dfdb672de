"""Mamba (Gu & Dao 2023) blocks and Mixture-of-Mamba (arXiv 2501.16295): SPEC §5.

One block (pre-RMSNorm residual, no FFN: a pure Mamba stack):

    x, z   = in_proj(Norm(h))                 [L, E] each, E = expand * D
    x      = silu(causal depthwise conv1d(x)) width K
    dt,B,C = x_proj(x)                        [L, R], [L, N], [L, N]
    Δ      = softplus(dt_proj(dt))            [L, E]
    s_t    = exp(Δ_t A) ⊙ s_{t-1} + Δ_t B_t x_t    state [E, N], A = -exp(A_log)
    y_t    = s_t C_t + D ⊙ x_t
    h     += out_proj(y ⊙ silu(z))

The recurrence is computed in float32 by models/ssm.py's `selective_scan`: an associative
scan inside chunks of `chunk` steps on GPU/TPU, the token-by-token recurrence with a
hand-written backward pass on CPU (`scan`), memory O(chunk · E · N) per chunk at a time,
not O(L · E · N).

Mixture-of-Mamba unties `in_proj`, `x_proj`, `dt_proj` (weight and bias) and `out_proj` by
modality (`untie`, any subset of UNTIE): each token goes through its own modality's copy,
as one grouped matmul over the rows (moe/rows.py, MoT's kernels; one row layout per block
serves all its untied projections), at the dense block's cost per token. `conv1d`,
`A_log`, `D`, the norm and the scan stay shared: the scan runs over the whole interleaved
sequence, its state crossing modality switches.

A hybrid (`attn_every` = n): every n-th layer is the dense family's transformer block
(attention + SwiGLU); with `ffn=moe` its SwiGLU is a MoE layer (moe/layer.py, the MoE
family's, built from `model.mamba.moe`), the block's `rng` passed to it as it came and its
router metrics and aux losses returned as the block's metrics; with `ffn=moma` the layer is
the MoMa family's block (models/moma.py MoMaBlock: modality-grouped expert-choice experts,
built from `model.mamba.moma`, with its auxiliary routers and their `aux` stage for causal
routing). The Mamba blocks stay FFN-free.

Decoding (models/generate.py): the block's cache is its conv window (the last K - 1 conv
inputs) and its state [B, E, N]; `decode` continues both over the new tokens.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from core import layers, partitioning
from core.partitioning import constrain
from data import tokenizer
from models import dense as dense_lib, family as family_lib, moe_ffn, moma as moma_lib, ssm
from moe import layer as moe_layer, rows

UNTIE = ('in', 'x', 'dt', 'out')
FFNS = ('dense', 'moe', 'moma')  # model.mamba.ffn: the hybrid attention layers' FFN
FFN_NAMES = {'dense': 'SwiGLU', 'moe': 'MoE', 'moma': 'MoMa'}
# The logical axis of each projection's input's last dimension (its contraction axis).
PROJ_INPUT = {'in': 'act_embed', 'x': 'act_mlp', 'dt': None, 'out': 'act_mlp'}


@dataclasses.dataclass(frozen=True)
class MambaSpec:
  """Settings of every Mamba block (built from `config.model.mamba`)."""
  state: int = 16  # N
  conv: int = 4  # K: depthwise conv width
  expand: int = 2  # E = expand * D
  dt_rank: int = 0  # R; 0 = ceil(D / 16)
  chunk: int = 64  # scan chunk length (memory O(chunk E N) per chunk)
  scan: str = 'auto'  # SCANS: the scan inside a chunk ('auto': sequential on CPU)
  untie: frozenset = frozenset()  # subset of UNTIE: projections per modality
  num_modalities: int = 2
  dt_min: float = 1e-3
  dt_max: float = 0.1

  def inner(self, embed_dim: int) -> int:
    return self.expand * embed_dim

  def rank(self, embed_dim: int) -> int:
    return self.dt_rank or math.ceil(embed_dim / 16)


def check_spec(spec: MambaSpec) -> None:
  if spec.scan not in ssm.SCANS:
    raise ValueError(f'model.mamba.scan={spec.scan!r} is not one of {ssm.SCANS}')
  bad = set(spec.untie) - set(UNTIE)
  if bad:
    raise ValueError(f'model.mamba.untie names {sorted(bad)}; choose from {UNTIE} or "all"')
  for key in ('state', 'conv', 'expand', 'chunk'):
    if getattr(spec, key) < 1:
      raise ValueError(f'model.mamba.{key} must be >= 1, got {getattr(spec, key)}')
  if not 0 < spec.dt_min <= spec.dt_max:
    raise ValueError(f'model.mamba.dt_min={spec.dt_min} and dt_max={spec.dt_max} must '
                     'satisfy 0 < dt_min <= dt_max')


def causal_conv(x_BLE, w_EK, b_E, window_BKE=None):
  """Depthwise causal conv: y[t] = b + sum_k w[:, k] x[t - K + 1 + k]; `window` holds the
  K - 1 inputs before x (zeros: the sequence start). -> (y, the last K - 1 inputs)."""
  K = w_EK.shape[1]
  Bsz, L, E = x_BLE.shape
  if window_BKE is None:
    window_BKE = jnp.zeros((Bsz, K - 1, E), x_BLE.dtype)
  full = jnp.concatenate([window_BKE.astype(x_BLE.dtype), x_BLE], axis=1)  # [B, L+K-1, E]
  w = w_EK.astype(jnp.float32)
  y = sum(full[:, k:k + L].astype(jnp.float32) * w[:, k] for k in range(K))
  return (y + b_E.astype(jnp.float32)).astype(x_BLE.dtype), full[:, L:]


# ---------------------------------------------------------------------------
# Parameters.


def _dt_bias_init(spec: MambaSpec):
  """softplus^-1(dt), dt = exp(U[ln dt_min, ln dt_max]) clamped >= 1e-4 (Mamba's init)."""
  def init(key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(spec.dt_max) - math.log(spec.dt_min)) + math.log(spec.dt_min))
    dt = jnp.maximum(dt, 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _uniform(bound: float):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Mixer(nnx.Module):
  """The Mamba mixer of one block (what sits between the norm and the residual add)."""

  def __init__(self, spec: MambaSpec, *, embed_dim: int, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.spec, self.dtype = spec, dtype
    D, E, N, K, R = (embed_dim, spec.inner(embed_dim), spec.state, spec.conv,
                     spec.rank(embed_dim))
    M = spec.num_modalities

    def weight(part, init, shape, axes):
      if part in spec.untie:
        shape, axes = (M,) + tuple(shape), ('modality',) + tuple(axes)
      return partitioning.param(rngs, init, shape, axes, param_dtype)
    fan = partitioning.fan_in_init
    self.in_proj = weight('in', fan(D), (D, 2, E), ('embed', None, 'mlp'))
    self.conv_w = partitioning.param(rngs, _uniform(K ** -0.5), (E, K), ('mlp', None),
                                     param_dtype)
    self.conv_b = partitioning.param(rngs, _uniform(K ** -0.5), (E,), ('mlp',), param_dtype)
    self.x_proj = weight('x', fan(E), (E, R + 2 * N), ('mlp', None))
    self.dt_w = weight('dt', _uniform(R ** -0.5), (R, E), (None, 'mlp'))
    self.dt_b = weight('dt', _dt_bias_init(spec), (E,), ('mlp',))
    a_log = lambda key, shape, dtype: jnp.broadcast_to(  # noqa: E731
        jnp.log(jnp.arange(1, N + 1, dtype=jnp.float32)), shape).astype(dtype)
    self.A_log = partitioning.param(rngs, a_log, (E, N), ('mlp', None), jnp.float32)
    self.D = partitioning.param(rngs, nnx.initializers.ones, (E,), ('mlp',), jnp.float32)
    self.out_proj = weight('out', fan(E), (E, D), ('mlp', 'embed'))

  def _proj(self, part, w, x_BLI, layout, modality_BL):
    """x @ w, each token with its own modality's copy of w when `part` is untied (rows in
    `layout`, the call's one modality layout, moe/rows.py; on a mesh, `_sharded_proj`)."""
    if part in self.spec.untie and layout is None:
      return self._sharded_proj(part, w[...].astype(self.dtype), w.out_sharding, x_BLI,
                                modality_BL)
    w = w[...].astype(self.dtype)
    Bsz, L, I = x_BLI.shape
    x = x_BLI.astype(self.dtype).reshape(Bsz * L, I)
    if part not in self.spec.untie:
      return (x @ w.reshape(I, -1)).reshape(Bsz, L, *w.shape[1:])
    y = rows.layout_matmul(rows.to_layout(x, layout), w.reshape(w.shape[0], I, -1), layout)
    return rows.from_layout(y, layout).reshape(Bsz, L, *w.shape[2:])

  def _sharded_proj(self, part, w, names, x_BLI, modality_BL):
    """The untied projection per batch shard (core/partitioning.per_shard, MoT's form): each
    device lays out only its own rows, the 'embed' axis of w gathered over fsdp; with the
    input's last axis on 'tensor' (x_proj, out_proj) the product is row-parallel and its
    partial sums are added over 'tensor', otherwise (in_proj, dt_proj) column-parallel.
    `names`: w's logical axes (its parameter's `out_sharding`)."""
    x_names = ('batch', 'length', PROJ_INPUT[part])
    row_parallel = PROJ_INPUT[part] == 'act_mlp'
    out_names = ('batch', 'length') + tuple(
        'act_mlp' if n == 'mlp' else 'act_embed' if n == 'embed' else None
        for n in names[2:])
    M = self.spec.num_modalities

    def local(x, mod, w, collectives):
      for axis, name in enumerate(names):
        if name == 'embed':
          w = partitioning.gather_fsdp(w, axis, collectives)
      Bsz, L, I = x.shape
      lay = rows.rows_layout(mod.reshape(-1), M)
      y = rows.layout_matmul(rows.to_layout(x.astype(self.dtype).reshape(Bsz * L, I), lay),
                             w.reshape(M, I, -1), lay)
      y = rows.from_layout(y, lay).reshape(Bsz, L, *w.shape[2:])
      return partitioning.psum_tensor(y, collectives) if row_parallel else y
    return partitioning.per_shard(local, (x_names, ('batch', 'length'), names), out_names)(
        x_BLI, modality_BL, w)

  def _bias(self, b, modality_BL):
    """The dt bias, untied: each token's modality's, as a one-hot product (its gradient a
    product too, not a scatter-add)."""
    b = b[...].astype(jnp.float32)
    if b.ndim == 1:
      return b
    return jax.nn.one_hot(modality_BL, b.shape[0], dtype=jnp.float32) @ b

  def __call__(self, h_BLD, modality_BL, cache=None):
    """-> (out [B, L, D], new cache or None). `cache` (decoding): {'conv': [B, K-1, E],
    'ssm': [B, E, N]}, continued over these L tokens."""
    spec = self.spec
    # One modality layout for every untied projection of the block; on a mesh each
    # projection lays out its shard's rows itself (`_sharded_proj`).
    layout = (rows.rows_layout(modality_BL.reshape(-1), spec.num_modalities)
              if spec.untie and not partitioning.manual_axes() else None)
    proj = lambda part, w, x: self._proj(part, w, x, layout, modality_BL)  # noqa: E731
    xz = proj('in', self.in_proj, h_BLD)  # [B, L, 2, E]
    x, z = xz[:, :, 0], xz[:, :, 1]
    x = constrain(x, ('batch', 'length', 'act_mlp'))
    conv, window = causal_conv(x, self.conv_w[...], self.conv_b[...],
                               None if cache is None else cache['conv'])
    x = jax.nn.silu(conv.astype(jnp.float32)).astype(self.dtype)
    dbc = proj('x', self.x_proj, x).astype(jnp.float32)
    R = spec.rank(h_BLD.shape[-1])
    dt, Bm, Cm = dbc[..., :R], dbc[..., R:R + spec.state], dbc[..., R + spec.state:]
    delta = jax.nn.softplus(proj('dt', self.dt_w, dt).astype(jnp.float32)
                            + self._bias(self.dt_b, modality_BL))
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    y, state = ssm.selective_scan(delta, A, Bm, Cm, x, chunk=spec.chunk, scan=spec.scan,
                                  state_BEN=None if cache is None else cache['ssm'])
    y = y + self.D[...].astype(jnp.float32) * x.astype(jnp.float32)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)
    out = proj('out', self.out_proj, y)
    out = constrain(out, ('batch', 'length', 'act_embed'))
    return out, (None if cache is None else {'conv': window, 'ssm': state})


def init_mamba_cache(spec: MambaSpec, batch: int, embed_dim: int, dtype) -> dict:
  E = spec.inner(embed_dim)
  return {'conv': constrain(jnp.zeros((batch, spec.conv - 1, E), dtype),
                            ('batch', None, 'act_mlp')),
          'ssm': constrain(jnp.zeros((batch, E, spec.state), jnp.float32),
                           ('batch', 'act_mlp', None))}


class MambaBlock(nnx.Module):
  """h + Mixer(RMSNorm(h)); `decode` carries the conv window and the state."""

  def __init__(self, decoder_spec, spec: MambaSpec, *, rngs: nnx.Rngs):
    s = decoder_spec
    self.spec = spec
    dtype, pdtype = layers.dtype_of(s.dtype), layers.dtype_of(s.param_dtype)
    self.dtype = dtype
    self.norm = layers.RMSNorm(s.embed_dim, param_dtype=pdtype, rngs=rngs)
    self.mixer = Mixer(spec, embed_dim=s.embed_dim, dtype=dtype, param_dtype=pdtype,
                       rngs=rngs)

  def __call__(self, x_BLD, sin_cos, rng=None, *, modality, causal=False):
    del sin_cos, rng, causal  # no positions (the recurrence orders), no routing
    out, _ = self.mixer(self.norm(x_BLD), modality)
    return x_BLD + out.astype(x_BLD.dtype), {}

  def init_cache(self, batch: int, max_len: int) -> dict:
    del max_len  # the state does not grow
    return init_mamba_cache(self.spec, batch, self.norm.scale.shape[0], self.dtype)

  def decode(self, x_BSD, sin_cos, *, modality, cache, index):
    del sin_cos, index
    out, cache = self.mixer(self.norm(x_BSD), modality, cache)
    return x_BSD + out.astype(x_BSD.dtype), cache


# ---------------------------------------------------------------------------
# The Mamba family (models/family.py): config -> spec, blocks, parameters, checks.


def mamba_spec_from_config(mcfg) -> MambaSpec:
  names = tokenizer.MODALITIES
  untie = {'all': ','.join(UNTIE), 'none': ''}.get(mcfg.untie, mcfg.untie)
  return MambaSpec(state=mcfg.state, conv=mcfg.conv, expand=mcfg.expand,
                   dt_rank=mcfg.dt_rank, chunk=mcfg.chunk, scan=mcfg.get('scan', 'auto'),
                   untie=frozenset(p.strip() for p in untie.split(',') if p.strip()),
                   num_modalities=len(names))


def is_attention_layer(spec, layer: int) -> bool:
  """A hybrid (model.mamba.attn_every = n > 0): layer i is a transformer block iff
  i % n == n - 1."""
  n = spec.ext['attn_every']
  return n > 0 and layer % n == n - 1


def _block(spec, layer, rngs):
  if not is_attention_layer(spec, layer):
    return MambaBlock(spec, spec.ext['mamba'], rngs=rngs)
  if spec.moma is not None:
    return moma_lib.MoMaBlock(spec, layer, num_modalities=spec.num_modalities, rngs=rngs)
  moe = spec.ext['moe']
  if moe is None:
    return dense_lib.Block(spec, rngs=rngs)
  dtype, pdtype = layers.dtype_of(spec.dtype), layers.dtype_of(spec.param_dtype)
  return dense_lib.Block(spec, ffn=moe_layer.MoELayer(
      moe, embed_dim=spec.embed_dim, dtype=dtype, param_dtype=pdtype, rngs=rngs), rngs=rngs)


def _mixer_params(spec, active: bool) -> dict[str, float]:
  """Parameters of one Mamba block by part (untied parts count M times unless `active`)."""
  m, d = spec.ext['mamba'], spec.embed_dim
  E, N, K, R = m.inner(d), m.state, m.conv, m.rank(d)
  copies = lambda part: 1 if active or part not in m.untie else m.num_modalities  # noqa
  return {'norm': d, 'in': d * 2 * E * copies('in'), 'conv': E * K + E,
          'x': E * (R + 2 * N) * copies('x'), 'dt': (R * E + E) * copies('dt'),
          'A_log': E * N, 'D': E, 'out': E * d * copies('out')}


def _layer_params(spec, layer: int, active: bool) -> float:
  if not is_attention_layer(spec, layer):
    return sum(_mixer_params(spec, active).values())
  if spec.moma is not None:
    return (family_lib.attention_and_norm_params(spec)
            + moma_lib.ffn_params(spec.moma, spec.embed_dim, active))
  if spec.ext['moe'] is None:
    return dense_lib.layer_params(spec, layer, active)
  return (family_lib.attention_and_norm_params(spec)
          + moe_ffn.moe_params(spec.ext['moe'], spec.embed_dim, active))


def _layer_summary(spec, layer: int) -> str:
  """The run log's per-layer table: Mamba, or attention with its FFN."""
  if not is_attention_layer(spec, layer):
    return 'mamba' + (' untie=' + ','.join(sorted(spec.ext['mamba'].untie))
                      if spec.ext['mamba'].untie else '')
  if spec.moma is not None:
    groups = ' '.join(f'{g.name}:{g.experts}' for g in spec.moma.groups)
    return f'attention + moma {groups} {spec.moma.router} F={spec.moma.mlp_dim}'
  moe = spec.ext['moe']
  if moe is None:
    return f'attention + dense F={spec.mlp_dim}'
  r = moe.router
  routed = f'c={r.capacity_factor:g}' if r.expert_choice else f'k={r.k}'
  return f'attention + moe E={moe.num_experts} {routed} F={moe.mlp_dim}'


def _attention_keys(spec, layer: int, seq_len: int) -> float:
  return float(seq_len) if is_attention_layer(spec, layer) else 0.0


def _matmul_params(spec, layer: int, active_params: float) -> float:
  """The projections (the conv, the scan and the D skip are elementwise: not counted); an
  attention layer's active parameters but its norms (a MoE's router included, as in the
  MoE family)."""
  if is_attention_layer(spec, layer):
    return active_params - 2 * spec.embed_dim
  p = _mixer_params(spec, True)
  return p['in'] + p['x'] + p['dt'] - spec.ext['mamba'].inner(spec.embed_dim) + p['out']


def _validate(config, sizes) -> None:
  mc = config.model.mamba
  for key in ('state', 'conv', 'expand', 'chunk'):
    if not isinstance(mc[key], int) or mc[key] < 1:
      raise ValueError(f'config.model.mamba.{key} must be a positive integer, got {mc[key]!r}')
  for key in ('dt_rank', 'attn_every'):
    if not isinstance(mc[key], int) or mc[key] < 0:
      raise ValueError(f'config.model.mamba.{key} must be a non-negative integer, got '
                       f'{mc[key]!r}')
  check_spec(mamba_spec_from_config(mc))
  inner = mc.expand * config.model.embed_dim
  if inner % sizes['tensor']:
    raise ValueError(f'the Mamba inner width model.mamba.expand x model.embed_dim = {inner} '
                     f"is not divisible by mesh.tensor={sizes['tensor']}")
  ffn = mc.get('ffn', 'dense')  # configs saved before the key: dense
  if ffn not in FFNS:
    raise ValueError(f'config.model.mamba.ffn={ffn!r} is not one of {FFNS}')
  if ffn != 'dense' and not mc.attn_every:
    raise ValueError(f"config.model.mamba.ffn={ffn} puts the {FFN_NAMES[ffn]} FFN in the "
                     "hybrid's attention layers: set config.model.mamba.attn_every > 0")
  if ffn == 'moe':
    _validate_moe(config, sizes)
  spec = (moma_lib.validate_block(mc.moma, config, sizes, key='model.mamba.moma')
          if ffn == 'moma' else None)
  if config.get('stage', 'main') == 'aux' and not (spec and spec.aux_groups()):
    raise ValueError("config.stage='aux' trains the auxiliary routers of a hybrid's MoMa "
                     "FFNs (model.mamba.ffn=moma with router=expert_choice); this model has "
                     "none")


def _validate_moe(config, sizes) -> None:
  """`ffn=moe`: the MoE block's keys, the MoE layer's own checks, and a hybrid to put it in."""
  mc = config.model.mamba
  moe_ffn.check_moe_block(mc.moe, 'model.mamba.moe')
  if mc.moe.mlp_dim % sizes['tensor']:
    raise ValueError(f"config.model.mamba.moe.mlp_dim={mc.moe.mlp_dim} is not divisible by "
                     f"mesh.tensor={sizes['tensor']}")
  moe_layer.check_moe_spec(moe_ffn.moe_spec_from_config(mc.moe, config.model.grouped_impl),
                           seq_len=config.seq_len, expert_shards=sizes['expert'])
  group = mc.moe.group_size or config.seq_len
  groups = config.batch_size * config.seq_len // group
  shards = sizes['data'] * sizes['fsdp'] * sizes['expert']
  if groups % shards:
    raise ValueError(f'{groups} routing groups of model.mamba.moe.group_size={group} tokens '
                     f'do not split over the {shards} batch shards')


def _spec_fields(model_cfg, stage: str) -> dict:
  mc = model_cfg.mamba
  ffn = mc.get('ffn', 'dense')
  moe = (moe_ffn.moe_spec_from_config(mc.moe, model_cfg.grouped_impl)
         if ffn == 'moe' else None)
  moma = (moma_lib.moma_spec_from_config(mc.moma, train_aux=stage == 'aux')
          if ffn == 'moma' else None)
  return {'ext': {'mamba': mamba_spec_from_config(mc), 'attn_every': mc.attn_every,
                  'moe': moe}, 'moma': moma}


FAMILY = family_lib.Family(
    name='mamba',
    spec_fields=_spec_fields,
    block=_block,
    layer_params=_layer_params,
    validate=_validate,
    attention_keys=_attention_keys,
    matmul_params=_matmul_params,
    decode_unsupported=lambda spec: (None if spec.ext['moe'] is None else
                                     moe_ffn.decode_unsupported_moe(spec.ext['moe'],
                                                                    'model.mamba.moe')),
    layer_summary=_layer_summary,
    expert_names=lambda spec: None if spec.moma is None else spec.moma.expert_names(),
    stages=('main', 'aux'),  # aux: the MoMa FFNs' auxiliary routers (ffn=moma)
    evaluators=('lm', 'causal', 'generation'),
)
