"""MoIIE routing (Wang et al. 2025, arXiv 2508.09779): per-modality routers over intra-modality
experts plus a shared inter-modality pool (models/moiie.py, docs/moiie.md).

One expert list, stacked on ONE expert axis (`Pool`): modality 0's experts, modality 1's, ...,
then the shared pool. Modality m's candidates are its own experts and the pool,

    cand(m) = own(m) ∪ shared,  C_m = E_m + E_s

and modality m has its own router, the columns `router_cols(m)` of the layer's router
weight [D, sum_m C_m]. A token x of modality m:

    l = x W_m  [C_m]   (float32; in training x is first jittered: x * U(1 - eps, 1 + eps))
    p = softmax(l)                   one softmax over the union: shared experts compete with
                                     the modality's own (neither always-on nor a second top-k)
    top-k of l (ties: the lower expert index), weights p_j / sum_{top-k} p  (renormalised)
    y = sum over its k experts of weight_j * FFN_j(x)

Load balance, per router over its own candidates and its own tokens only (Switch):

    L_m = C_m * sum_{j in cand(m)} f_j P_j,   f_j = fraction of modality-m tokens whose top-1
          is j,   P_j = mean of p_j over modality-m tokens (every modality-m token of the
          batch, all routing groups together); L_m = 0 when the batch has no modality-m token
    aux_loss = load_balance_coef * sum_m L_m

`route` returns the `(Routing, metrics)` of every router in moe/ (moe/routing.py): S * k
pairs per routing group, token-major, all valid, over the stacked axis of
`Pool.num_experts` experts, so dispatch, the grouped kernels and expert parallelism serve
it unchanged (`moe.layer.run_experts(..., dropless=True)`). Token choice routes every token
alone, so the routing group is only the dispatch's unit and decoding routes the new tokens
with the same function.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.routing import Routing

SHARED = 'shared'  # name of the inter-modality pool in expert names


@dataclasses.dataclass(frozen=True)
class Pool:
  """The expert list of one MoIIE layer: per-modality experts, then the shared pool."""
  modalities: tuple[str, ...]  # modality names, in modality-id order
  experts: tuple[int, ...]  # E_m: intra-modality experts of each modality
  shared: int  # E_s: experts every modality's router may pick

  @property
  def num_experts(self) -> int:
    """E_total = sum_m E_m + E_s (the stacked expert axis)."""
    return sum(self.experts) + self.shared

  def own(self, m: int) -> tuple[int, ...]:
    """Stacked indices of modality m's own experts."""
    start = sum(self.experts[:m])
    return tuple(range(start, start + self.experts[m]))

  def candidates(self, m: int) -> tuple[int, ...]:
    """Stacked indices modality m's router chooses among: its own experts, then the pool."""
    pool = tuple(range(sum(self.experts), self.num_experts))
    return self.own(m) + pool

  def router_cols(self, m: int) -> slice:
    """Modality m's router: these columns of the router weight [D, sum_m C_m]."""
    start = sum(len(self.candidates(i)) for i in range(m))
    return slice(start, start + len(self.candidates(m)))

  @property
  def router_width(self) -> int:
    return sum(len(self.candidates(m)) for m in range(len(self.modalities)))

  def names(self) -> list[str]:
    """'text/0', ..., 'image/3', 'shared/0', ...: one per stacked expert."""
    return ([f'{name}/{j}' for name, n in zip(self.modalities, self.experts)
             for j in range(n)] + [f'{SHARED}/{j}' for j in range(self.shared)])


def _scatter(cols_GSC, index: tuple[int, ...], num_experts: int, fill: float):
  """[G, S, C] values at stacked experts `index` -> [G, S, E], `fill` elsewhere."""
  out = jnp.full(cols_GSC.shape[:-1] + (num_experts,), fill, cols_GSC.dtype)
  return out.at[..., jnp.asarray(index)].set(cols_GSC)


def route(pool: Pool, logits_GSR: jax.Array, modality_GS: jax.Array, *, k: int,
          load_balance_coef: float) -> tuple[Routing, dict[str, jax.Array]]:
  """Routing of every token by its modality's router -> (Routing, metrics).

  logits_GSR [G, S, R]: every router's logits (R = `pool.router_width`; modality m's are the
  columns `pool.router_cols(m)`), float32. `k` must not exceed any modality's candidates
  (models/moiie.py validates it). Metrics: `aux_loss` (weighted), `load_balance_loss`
  (sum over routers of L_m) and `load_balance_loss_<modality>` (L_m).
  """
  logits_GSR = logits_GSR.astype(jnp.float32)
  G, S, _ = logits_GSR.shape
  E = pool.num_experts
  rank_GSE = jnp.zeros((G, S, E), jnp.float32)  # the token's router logits; -inf elsewhere
  log_p_GSE = jnp.zeros((G, S, E), jnp.float32)  # log p over the token's candidates
  p_GSE = jnp.zeros((G, S, E), jnp.float32)  # p over the token's candidates; 0 elsewhere
  members = []
  for m in range(len(pool.modalities)):
    cand = pool.candidates(m)
    cols = logits_GSR[..., pool.router_cols(m)]
    log_p = jax.nn.log_softmax(cols, axis=-1)
    is_m = (modality_GS == m)[..., None]
    members.append(is_m[..., 0])
    rank_GSE = jnp.where(is_m, _scatter(cols, cand, E, -jnp.inf), rank_GSE)
    log_p_GSE = jnp.where(is_m, _scatter(log_p, cand, E, 0.0), log_p_GSE)
    p_GSE = jnp.where(is_m, _scatter(jnp.exp(log_p), cand, E, 0.0), p_GSE)
  # Rank the logits themselves (exact where p underflows); k <= C_m never picks an -inf.
  _, expert_GSk = jax.lax.top_k(jax.lax.stop_gradient(rank_GSE), k)
  log_w_GSk = jnp.take_along_axis(log_p_GSE, expert_GSk, axis=-1)
  weight_GSk = jax.nn.softmax(log_w_GSk, axis=-1)  # p renormalised over the chosen k
  token_GSk = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (G, S, k))
  routing = Routing(token=token_GSk.reshape(G, S * k), expert=expert_GSk.reshape(G, S * k)
                    .astype(jnp.int32), weight=weight_GSk.reshape(G, S * k),
                    valid=jnp.ones((G, S * k), bool), num_experts=E, group_size=S,
                    max_per_expert=S, max_valid=S * k)
  top1_GSE = jax.nn.one_hot(expert_GSk[..., 0], E, dtype=jnp.float32)
  metrics, total = {}, jnp.zeros((), jnp.float32)
  for m, (name, member_GS) in enumerate(zip(pool.modalities, members)):
    loss = load_balance(p_GSE, top1_GSE, member_GS, len(pool.candidates(m)))
    metrics[f'load_balance_loss_{name}'] = loss
    total = total + loss
  return routing, {'aux_loss': load_balance_coef * total, 'load_balance_loss': total,
                   **metrics}


def load_balance(p_GSE, top1_GSE, member_GS, num_candidates: int) -> jax.Array:
  """Switch loss of one router over its member tokens: C_m * sum_j f_j P_j (p and top-1 are
  0 outside the router's candidates, so the sum over all E is the sum over its C_m).
  Differentiable through P only."""
  w_GS = member_GS.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w_GS), 1.0)
  f_E = jnp.einsum('GSE,GS->E', top1_GSE, w_GS) / count
  P_E = jnp.einsum('GSE,GS->E', p_GSE, w_GS) / count
  return num_candidates * jnp.sum(f_E * P_E)
