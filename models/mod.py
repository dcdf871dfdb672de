"""Mixture-of-depths (Raposo et al. 2024), "staged" as in MoMa: before the modality split.

In a MoD layer a router `g = sigmoid(x w)`, w [D, 1], scores every token; per sequence the
top `k = round(c_d * T)` tokens (c_d = 0.25 by default) go through the layer (attention and
FFN), the others skip it unchanged:

    selected i:  x_i + g_i * (layer(x_sel)_i - x_i)    (scale=True: the Raposo et al. form,
                 x_i +       (layer(x_sel)_i - x_i)     which gives w its gradient; default)
    skipped i:   x_i                                    (exactly)

`layer(x_sel)` runs on the gathered [B, k, D] selection in position order, with the tokens'
own RoPE positions, so causal attention among the selected tokens is the same as masking
the others out of the full sequence - k/T of the compute.

Causal inference: top-k over the sequence sees the future. An `AuxRouter` (W1 [D, D/2],
W2 [D/2, 1], trained in the aux stage with BCE against the top-k selection) decides per
token instead: selected iff its score > 0.5. With a data-dependent count the layer then runs
on the full sequence with the unselected tokens masked out of attention (every query keeps
itself as a key, so no row is empty; unselected outputs are discarded).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from core import layers, partitioning
from moe import depth


@dataclasses.dataclass(frozen=True)
class MoDSpec:
  capacity: float = 0.25  # c_d: fraction of each sequence's tokens through a MoD layer
  every: int = 2  # layer i is a MoD layer iff i % every == 0 (alternating from layer 0)
  scale: bool = True  # multiply the layer's update by the router weight g

  def is_mod_layer(self, i: int) -> bool:
    return i % self.every == 0

  def num_selected(self, seq_len: int) -> int:
    return max(1, min(seq_len, round(self.capacity * seq_len)))


def check_spec(spec: MoDSpec) -> None:
  if not 0 < spec.capacity <= 1:
    raise ValueError(f'model.moma.mod.capacity must be in (0, 1], got {spec.capacity}')
  if spec.every < 1:
    raise ValueError(f'model.moma.mod.every must be >= 1, got {spec.every}')


def init_selected(batch: int, max_len: int) -> jax.Array:
  """A MoD layer's decoding cache: bool [B, L], the positions it processed."""
  return partitioning.constrain(jnp.zeros((batch, max_len), bool), ('batch', None))


class MoD(nnx.Module):
  """Router (+ auxiliary router) of one MoD layer; `__call__` wraps the layer's function."""

  def __init__(self, spec: MoDSpec, *, embed_dim: int, param_dtype, rngs: nnx.Rngs,
               aux_router: nnx.Module):
    self.spec = spec
    self.router = partitioning.param(rngs, nnx.initializers.normal(embed_dim ** -0.5),
                               (embed_dim, 1), ('embed', None), param_dtype)
    self.aux_router = aux_router
    # eval only (Decoder(attention_stats=True)): sow which tokens the layer's attention saw
    self.attention_stats = False

  def __call__(self, layer_fn, x_BTD, sin_cos, modality_BT, *, causal=False,
               train_aux=False):
    """`layer_fn(x, sin_cos, modality, member, attn_mask) -> (y, aux)` is the wrapped layer
    (attention + FFN with their residuals). Returns (x_out, aux). The routing is
    moe/depth.py's."""
    B, T, D = x_BTD.shape
    logits = (x_BTD.astype(jnp.float32) @ self.router[...].astype(jnp.float32))[..., 0]
    if causal:
      routing, metrics = depth.causal_route(
          logits, self.aux_router(jax.lax.stop_gradient(x_BTD))[..., 0])
      chosen = routing.valid
      if self.attention_stats:
        self.sow(nnx.Intermediate, 'query_mask', chosen, capture_noop=True)
      mask = chosen[:, None, :] | jnp.eye(T, dtype=bool)[None]
      y, aux = layer_fn(x_BTD, sin_cos, modality_BT, chosen, mask)
      scale = routing.weight[..., None] if self.spec.scale else 1.0
      out = jnp.where(chosen[..., None], x_BTD + scale * (y - x_BTD), x_BTD)
      aux = {**aux, 'mod/selected_fraction': metrics['selected_fraction']}
      return out.astype(x_BTD.dtype), aux
    routing, metrics = depth.route(logits, self.spec.num_selected(T))
    idx = routing.token
    if self.attention_stats:  # the positions of the attention's queries, in order
      self.sow(nnx.Intermediate, 'query_index', idx, capture_noop=True)
    take = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)),
                                         axis=1)
    x_sel = take(x_BTD)
    sin_cos_sel = tuple(take(t) for t in sin_cos)
    y, aux = layer_fn(x_sel, sin_cos_sel, take(modality_BT), None, None)
    delta = y - x_sel
    if self.spec.scale:
      delta = delta * routing.weight[..., None].astype(delta.dtype)
    out = x_BTD.at[jnp.arange(B)[:, None], idx].add(delta.astype(x_BTD.dtype))
    aux = {**aux, 'mod/selected_fraction': metrics['selected_fraction']}
    if train_aux:
      chosen = depth.selected(routing)
      aux_logits = self.aux_router(jax.lax.stop_gradient(x_BTD))[..., 0]
      aux['mod/aux_router_loss'] = jnp.mean(optax.sigmoid_binary_cross_entropy(
          aux_logits, chosen))
      aux['mod/aux_router_accuracy'] = jnp.mean(((aux_logits > 0) == (chosen > 0)))
    return out, aux

  def decode(self, layer_fn, x_BSD, selected_BL, index_B):
    """The causal routing on S new tokens at positions index[b] + s (models/generate.py):
    `layer_fn(x, member, key_mask [B, L]) -> y` runs the layer with the cached attention,
    whose keys are the positions selected so far and now. -> (x_out, selected)."""
    logits = (x_BSD.astype(jnp.float32) @ self.router[...].astype(jnp.float32))[..., 0]
    routing, _ = depth.causal_route(logits, self.aux_router(x_BSD)[..., 0])
    chosen = routing.valid
    selected = layers.write_rows(selected_BL, chosen, index_B)
    y = layer_fn(x_BSD, chosen, selected)
    scale = routing.weight[..., None] if self.spec.scale else 1.0
    out = jnp.where(chosen[..., None], x_BSD + scale * (y - x_BSD), x_BSD)
    return out.astype(x_BSD.dtype), selected
