"""The mixture-of-depths router (Raposo et al. 2024; models/mod.py wraps a layer with it):
expert choice with one expert, the layer, per sequence. It returns the `(Routing, metrics)`
of every router in moe/ (moe/routing.py): one routing group per sequence, expert 0, pairs in
position order.

  batch (training, `route`)   the top k = round(c_d T) tokens by router logit take the
                              layer: P = k pairs, all valid; weight = sigmoid(logit)
  causal (`causal_route`)     each token decides alone from its auxiliary router (score >
                              0.5): P = T pairs, valid where chosen
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.routing import Routing


def route(logits_BT: jax.Array, k: int) -> tuple[Routing, dict]:
  """-> (Routing of the top-k tokens of each sequence in position order, {'selected_fraction'})."""
  B, T = logits_BT.shape
  _, token = jax.lax.top_k(logits_BT, k)
  token = jnp.sort(token, axis=-1).astype(jnp.int32)  # causal attention among the selected
  weight = jnp.take_along_axis(jax.nn.sigmoid(logits_BT), token, axis=1)
  routing = Routing(token=token, expert=jnp.zeros_like(token), weight=weight,
                    valid=jnp.ones((B, k), bool), num_experts=1, group_size=T)
  return routing, {'selected_fraction': jnp.asarray(k / T, jnp.float32)}


def causal_route(logits_BT: jax.Array, aux_logits_BT: jax.Array) -> tuple[Routing, dict]:
  """-> (Routing over every position, valid where the aux router chose it, {'selected_fraction'})."""
  B, T = logits_BT.shape
  chosen = aux_logits_BT > 0  # aux sigmoid > 0.5
  token = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  routing = Routing(token=token, expert=jnp.zeros_like(token),
                    weight=jax.nn.sigmoid(logits_BT), valid=chosen, num_experts=1,
                    group_size=T)
  return routing, {'selected_fraction': jnp.mean(chosen.astype(jnp.float32))}


def selected(routing: Routing) -> jax.Array:
  """float32 [B, T]: 1 where the layer processes the token (the aux router's target)."""
  B, _ = routing.token.shape
  out = jnp.zeros((B, routing.group_size), jnp.float32)
  return out.at[jnp.arange(B)[:, None], routing.token].max(routing.valid.astype(jnp.float32))
