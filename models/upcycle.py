"""Upcycling: a MoMa or a MoE model initialised from a trained dense (or MoMa `1t1i`) one.

MoMa targets (MoMa paper, SPEC §2):

    source (dense | 1t1i MoMa)            new MoMa (any groups, e.g. 4t4i, + shared pool)
    FFN of modality m          ------->   every expert of modality m's group (a copy)
    mean of the modality FFNs  ------->   every expert of the shared (MoIIE) pool
    attention, norms, embed, final norm, LM head   copied unchanged
    MoD router of layer i      ------->   MoD router of layer i (if both have one there)
    MoMa routers, aux routers (MoMa and MoD)       the new model's fresh init

A dense source has one FFN that serves every modality; a `1t1i` source has one expert per
modality group (the modality-untied FFN). The shared pool's experts take the element-wise
mean of the source's FFN weights over the modalities the pool serves (a weight-space
average: for a dense source it is exactly the dense FFN, for a `1t1i` source it is not the
mean of the two FFNs' outputs, SwiGLU being nonlinear; it is a neutral start that Gumbel
noise and training pull apart). Weights are cast to the new model's param dtype.

The copied experts of one group are identical at step 0; expert choice with the fresh
router and Gumbel-sigmoid noise (`model.moma.gumbel`, set by configs/moma.py's
`upcycle_from=`) breaks the symmetry. With `4t4i` and c = 1/4 the upcycled model is not the
source's function (each expert takes a quarter of its modality's tokens, gated by the
sigmoid); a `1t1i` target with norm 'pre' from a dense source is exactly the source model.

MoE targets, fine-grained upcycling (SPEC §6, `model.moe.slices` = g; a dense source):

    dense FFN of layer i, hidden width F   ->  g slices: columns [s F/g, (s+1) F/g) of
                                               w_gate and w_up, the same rows of w_down
    slice s                                ->  experts s, s + g, s + 2g, ... (E/g clones each)
    router                                 ->  zeros
    PR-MoE residual MLP (model.moe.residual) -> the whole dense FFN; its mix -> zeros
    dense layers of the MoE model, attention, norms, embed, LM head   copied unchanged

Why the upcycled model is exactly the dense one at step 0 (up to float summation order):
SwiGLU is a sum over its hidden units, FFN(x) = sum_s FFN_s(x) over the slices. With a
zero router every logit is exactly 0 (jitter only scales the input), so the top-k of a
token are the k lowest expert indices (`lax.top_k` breaks ties to the lower index), i.e.
experts 0..k-1: with k = m g and slice(e) = e % g, every slice exactly m times, whatever
the token. Renormalised weights are 1/k each, and the layer scales its routed output by g
(`MoESpec.routed_scale`): g * sum_s m * FFN_s(x) / k = FFN(x). Under the residual form both
branches compute FFN(x) and the zero mix weighs them 1/2 each. This needs token choice,
dropless dispatch, renormalize, k a multiple of g and no shared experts
(models/moe_ffn.py `upcycle_problems`, checked before anything is read). From the first
update on, the router's gradient makes tokens pick other clones, and clones of one slice
may fire together (logged as `layer_i/clone_cofire`, moe/layer.py `clone_metrics`). g = 1
is plain sparse upcycling: every expert a copy of the FFN.

EvoMoE's expert spawning (SPEC §6; router `evomoe` or `activation_gate`, `slices=1`): the
same cut, then a documented spawn operation (`model.moe.spawn`): 'copy' leaves the E copies
identical (the gate's Gumbel noise and training pull them apart); 'noise' adds to expert e's
copy of each weight matrix N(0, (spawn_noise * std of that source matrix)^2) noise, drawn
from key(0) folded with the layer, the matrix and nothing else (the same draw in every run).
A gated model is not the source's function at step 0: its weights are the gate's g, not 1/k
(with a zero router g = 1/E for every expert, so the soft phase with k = E starts as the
source model in expectation over the noise, and top-1 evaluation gives FFN(x) / E).

`upcycle(src_spec, src_params, new_spec, new_params)` is pure and jit-able (shapes decide
everything, no values are read): training/warm_start.py runs it under
`jax.jit(out_shardings=...)`, with the fresh init inside the same jit, so no parameter is
ever gathered on one device. `check_compatible` raises a clear ValueError first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import moe_ffn, moma as moma_lib

FFN_WEIGHTS = ('w_gate', 'w_up', 'w_down')  # SwiGLU [D, F], [D, F], [F, D]; experts add E
COPIED = ('embed', 'final_norm', 'lm_head')  # top-level params copied unchanged
COPIED_IN_BLOCK = ('attn_norm', 'attn', 'ffn_norm')  # per-layer params copied unchanged
SHAPE_KEYS = ('num_layers', 'embed_dim', 'num_heads', 'num_kv_heads', 'head_dim',
              'vocab_size', 'num_modalities')


def source_kind(spec) -> str:
  """'dense' | 'moma_1t1i'; ValueError for anything else (MoE, several experts a group)."""
  if spec.moma is None and spec.moe is None:
    return 'dense'
  m = spec.moma
  if m is not None and all(g.experts == 1 and g.name != moma_lib.SHARED for g in m.groups):
    return 'moma_1t1i'
  what = ('a MoE model' if spec.moe is not None else
          f'MoMa with groups {[f"{g.name}:{g.experts}" for g in m.groups]}')
  raise ValueError(f'upcycling needs a dense or a 1-expert-per-modality MoMa (1t1i, no '
                   f'shared pool) source, got {what}')


def source_ffn_width(spec) -> int:
  return spec.mlp_dim if spec.moma is None else spec.moma.mlp_dim


def source_norm(spec) -> str:
  return 'pre' if spec.moma is None else spec.moma.norm  # dense Block is pre-norm


def target_kind(spec) -> str:
  """'moma' | 'moe'; ValueError for anything else."""
  if spec.moma is not None:
    return 'moma'
  if spec.moe is not None:
    return 'moe'
  raise ValueError('upcycling builds a MoMa or a MoE model: set model.family=moma or moe')


def check_compatible(src_spec, new_spec) -> None:
  """ValueError naming every mismatch between a source and an upcycled DecoderSpec."""
  kind = source_kind(src_spec)
  target = target_kind(new_spec)
  problems = [f'model.{k}: source {getattr(src_spec, k)} vs {getattr(new_spec, k)}'
              for k in SHAPE_KEYS if getattr(src_spec, k) != getattr(new_spec, k)]
  if target == 'moe':
    _check_moe_target(kind, src_spec, new_spec, problems)
    return
  width = source_ffn_width(src_spec)
  if width != new_spec.moma.mlp_dim:
    problems.append(f'model.moma.mlp_dim={new_spec.moma.mlp_dim} (each expert) must equal '
                    f'the source FFN width {width}')
  norm = source_norm(src_spec)
  if norm != new_spec.moma.norm:
    hint = (' (a dense Block is pre-norm: upcycle it with model.moma.norm=\'pre\', '
            'configs/moma.py arg norm=pre)' if kind == 'dense' else '')
    problems.append(f'model.moma.norm={new_spec.moma.norm!r} differs from the source\'s '
                    f'{norm!r}{hint}')
  if problems:
    raise ValueError(f'cannot upcycle this {kind} source into the new model: '
                     + '; '.join(problems))


def _check_moe_target(kind: str, src_spec, new_spec, problems: list[str]) -> None:
  if kind != 'dense':
    raise ValueError(f'fine-grained upcycling into a MoE model needs a dense source, got a '
                     f'{kind} one')
  width, g = src_spec.mlp_dim, new_spec.moe.clone_groups
  if width != new_spec.mlp_dim:  # the MoE model's dense layers take the FFN as it is
    problems.append(f'model.mlp_dim: source {width} vs {new_spec.mlp_dim}')
  if g >= 1 and new_spec.moe.mlp_dim * g != width:
    problems.append(f'model.moe.mlp_dim={new_spec.moe.mlp_dim} x model.moe.slices={g} must '
                    f'equal the source FFN width {width}')
  problems += moe_ffn.upcycle_problems(new_spec.moe)
  counts = {moe_ffn.layer_moe(new_spec, i).num_experts for i in range(new_spec.num_layers)
            if moe_ffn.is_moe_layer(new_spec, i)}
  if g >= 1 and any(e % g for e in counts):
    problems.append(f'expert counts {sorted(e for e in counts if e % g)} are not multiples '
                    f'of model.moe.slices={g} (each slice has E/g clones)')
  if problems:
    raise ValueError(f'cannot upcycle this {kind} source into the new model: '
                     + '; '.join(problems))


def expert_sources(src_spec, new_spec) -> tuple[tuple[int, ...], ...]:
  """Per group of the new model, the indices of the source FFNs its experts come from (one
  index: a copy; several: their mean). Source FFN index = expert index of a 1t1i source
  (its groups in modality order), 0 for a dense source."""
  if source_kind(src_spec) == 'dense':
    ffn_of = lambda modality: 0
  else:
    by_modality = {g.modalities: off for g, off in zip(src_spec.moma.groups,
                                                        src_spec.moma.offsets)}
    ffn_of = lambda modality: by_modality[(modality,)]
  return tuple(tuple(sorted({ffn_of(m) for m in g.modalities})) for g in new_spec.moma.groups)


def cast_like(src_tree, new_tree):
  return jax.tree.map(lambda s, n: s.astype(n.dtype), src_tree, new_tree)


def _experts(src_ffn: dict, new_experts: dict, src_dense: bool, sources, sizes) -> dict:
  """Stacked expert weights [E_total, ...] of the new layer from the source FFN(s)."""
  out = {}
  for name in FFN_WEIGHTS:
    stack = src_ffn[name][None] if src_dense else src_ffn[name]  # [S, ...]
    parts = []
    for idx, n in zip(sources, sizes):
      if len(idx) == 1:
        w = stack[idx[0]]
      else:  # shared pool: mean in float32 over the modality FFNs it serves
        w = jnp.mean(stack[jnp.asarray(idx)].astype(jnp.float32), axis=0)
      parts.append(jnp.broadcast_to(w[None], (n,) + w.shape))
    out[name] = jnp.concatenate(parts, axis=0).astype(new_experts[name].dtype)
  return out


def fine_grained_experts(ffn: dict, g: int, num_experts: int) -> dict:
  """Stacked [E, ...] expert weights cut from one dense SwiGLU {w_gate, w_up: [D, F],
  w_down: [F, D]}: expert e = slice e % g (w_gate/w_up columns and w_down rows
  [s F/g, (s+1) F/g) of slice s)."""
  D, F = ffn['w_gate'].shape
  f = F // g
  cols = lambda w: jnp.transpose(w.reshape(D, g, f), (1, 0, 2))  # [g, D, F/g]
  sliced = {'w_gate': cols(ffn['w_gate']), 'w_up': cols(ffn['w_up']),
            'w_down': ffn['w_down'].reshape(g, f, D)}
  return {k: jnp.tile(w, (num_experts // g, 1, 1)) for k, w in sliced.items()}


def spawn_noise(experts: dict, ffn: dict, scale: float, *, layer: int) -> dict:
  """EvoMoE's 'noise' spawn: expert weights [E, ...] plus N(0, (scale * std(source))^2),
  one draw per (layer, matrix) from key(0), every expert its own noise."""
  out = {}
  for j, name in enumerate(FFN_WEIGHTS):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), layer), j)
    w = experts[name].astype(jnp.float32)
    std = jnp.std(ffn[name].astype(jnp.float32))
    out[name] = w + scale * std * jax.random.normal(key, w.shape, jnp.float32)
  return out


def _upcycle_moe_pure(src_spec, src: dict, new_spec, new: dict) -> dict:
  """Fine-grained upcycling of a dense source into a MoE model (the module docstring)."""
  g = new_spec.moe.clone_groups
  out = dict(new)
  for key in COPIED:
    out[key] = cast_like(src[key], new[key])
  out['blocks'] = {}
  for i in range(new_spec.num_layers):
    s, n = src['blocks'][i], new['blocks'][i]
    block = dict(n)
    for key in COPIED_IN_BLOCK:
      block[key] = cast_like(s[key], n[key])
    if moe_ffn.layer_moe(new_spec, i) is None:
      block['ffn'] = cast_like(s['ffn'], n['ffn'])
    else:
      ffn = dict(n['ffn'])
      experts = n['ffn']['experts']
      cut = fine_grained_experts(s['ffn'], g, experts['w_gate'].shape[0])
      if new_spec.moe.spawn_noise:
        cut = spawn_noise(cut, s['ffn'], new_spec.moe.spawn_noise, layer=i)
      ffn['experts'] = cast_like(cut, experts)
      ffn['router'] = jnp.zeros_like(n['ffn']['router'])
      if 'residual_mlp' in n['ffn']:
        ffn['residual_mlp'] = cast_like(s['ffn'], n['ffn']['residual_mlp'])
        ffn['residual_mix'] = jnp.zeros_like(n['ffn']['residual_mix'])
      block['ffn'] = ffn
    out['blocks'][i] = block
  return out


def upcycle_pure(src_spec, src: dict, new_spec, new: dict) -> dict:
  """`upcycle` on nested pure dicts (`nnx.to_pure_dict`); returns a new dict."""
  check_compatible(src_spec, new_spec)
  if target_kind(new_spec) == 'moe':
    return _upcycle_moe_pure(src_spec, src, new_spec, new)
  src_dense = source_kind(src_spec) == 'dense'
  sources = expert_sources(src_spec, new_spec)
  sizes = [g.experts for g in new_spec.moma.groups]
  out = dict(new)
  for key in COPIED:
    out[key] = cast_like(src[key], new[key])
  out['blocks'] = {}
  for i in range(new_spec.num_layers):
    s, n = src['blocks'][i], new['blocks'][i]
    block = dict(n)  # keeps the fresh routers, aux routers and MoD of the new init
    for key in COPIED_IN_BLOCK:
      block[key] = cast_like(s[key], n[key])
    src_ffn = s['ffn'] if src_dense else s['ffn']['experts']
    block['ffn'] = {**n['ffn'], 'experts': _experts(src_ffn, n['ffn']['experts'], src_dense,
                                                    sources, sizes)}
    if 'mod' in n and 'mod' in s:  # the same layer was a MoD layer in the source
      block['mod'] = {**n['mod'], 'router': cast_like(s['mod']['router'],
                                                       n['mod']['router'])}
    out['blocks'][i] = block
  return out


def describe_target(spec) -> str:
  """The upcycled model, for the run log."""
  if target_kind(spec) == 'moma':
    return 'MoMa groups ' + ', '.join(f'{g.name}:{g.experts}' for g in spec.moma.groups)
  counts = sorted({moe_ffn.layer_moe(spec, i).num_experts for i in range(spec.num_layers)
                   if moe_ffn.is_moe_layer(spec, i)})
  g = spec.moe.clone_groups
  if spec.moe.router.gated:
    spawn = (f'copies plus noise {spec.moe.spawn_noise:g} x std' if spec.moe.spawn_noise
             else 'copies')
    return (f'MoE experts {"/".join(map(str, counts))} spawned from the dense FFN ({g} '
            f'slices, {spawn}) under the {spec.moe.router.name} gate (not the source '
            'function at step 0)')
  return (f'MoE experts {"/".join(map(str, counts))}: the FFN cut into {g} slices of width '
          f'{spec.moe.mlp_dim}, top-{spec.moe.router.k} routing from zero routers (step 0 '
          f'computes the source model)')


def start_warnings(spec) -> list[str]:
  """What the run log should warn about in an upcycled model."""
  if (target_kind(spec) == 'moma' and not spec.moma.gumbel
      and any(g.routed for g in spec.moma.groups)):
    return ['upcycling without Gumbel routing noise (model.moma.gumbel=False): the copied '
            'experts of a group start identical']
  return []


def upcycle(src_spec, src_params, new_spec, new_params):
  """New params from a source model's (see the module docstring). `src_params` and
  `new_params` are `nnx.State`s (or pure dicts) of `Decoder(src_spec)` and of a fresh
  `Decoder(new_spec)`; returns the new model's params in `new_params`'s form. Pure and
  jit-able; raises ValueError (before any work) when the specs do not fit."""
  check_compatible(src_spec, new_spec)
  return in_form_of(upcycle_pure, src_spec, src_params, new_spec, new_params)


def in_form_of(pure_fn, src_spec, src_params, new_spec, new_params):
  """`pure_fn(src_spec, src, new_spec, new)` on pure dicts, returned in `new_params`'s form
  (a copied nnx.State, or a pure dict): what every family's upcycler returns."""
  as_pure = lambda p: nnx.to_pure_dict(p) if isinstance(p, nnx.State) else p  # noqa: E731
  pure = pure_fn(src_spec, as_pure(src_params), new_spec, as_pure(new_params))
  if not isinstance(new_params, nnx.State):
    return pure
  out = jax.tree.map(lambda x: x, new_params)  # a copy: the caller's state stays as it was
  nnx.replace_by_pure_dict(out, pure)
  return out
