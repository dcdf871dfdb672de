"""Routers: which experts each token goes to, with what weight, plus routing metrics.

Every router returns `(Routing, metrics)` (also MoMa's modality-group routing,
moe/modality.py, and the mixture-of-depths router, moe/depth.py). A `Routing` is a list of token->expert PAIRS per
routing group, in PRIORITY order (capacity-based dispatch admits pairs first-come in this
order, so e.g. batch-prioritised routing just orders its pairs by score):

  token  int32 [G, P]   index of the token in its group, in [0, S)
  expert int32 [G, P]   expert index, in [0, E)
  weight f32   [G, P]   combine weight of the pair (the gate value)
  valid  bool  [G, P]   False for pairs that must be ignored (weight is then 0)

Token-choice top-k gives P = S * k pairs (token-major: pair s*k + j is token s's j-th
choice); expert-choice gives P = E * C (expert-major).

Routers are pure functions of the router logits `[G, S, E]` (the MoE layer owns the weight
and computes `logits = x @ w_router` in float32); all router math is float32. Pick one by
name from `ROUTERS`, or through `route(config, logits)` with a `RouterConfig`:

  topk_softmax           token choice, p = softmax(logits), weights = top-k p
  topk_sigmoid           token choice, independent scores p = sigmoid(logits)
  batch_prioritized      topk_softmax, pairs ordered so confident tokens claim capacity first
  expert_choice          each expert takes the top-C tokens of its softmax column
  expert_choice_sigmoid  the same with sigmoid scores (MoMa)

Token-choice routers return all S*k pairs valid: capacity is applied by the dispatch (or not
at all, dropless). Expert-choice routers apply their capacity C themselves.
Ties (equal logits) go to the lower expert index / lower token index (`lax.top_k`).

Metrics, the same keys for every router (float32 scalars, `expert_load` is [E]):
  aux_loss           load_balance_coef * load_balance_loss + z_loss_coef * z_loss
  load_balance_loss  Switch: E * sum_i f_i * P_i, per group then averaged over groups;
                     f_i = fraction of tokens whose top-1 expert is i, P_i = mean of the
                     token's routing distribution p (below). Differentiable through P only.
  z_loss             mean over tokens of logsumexp(logits)^2 (ST-MoE)
  expert_load        [E] fraction of the valid pairs assigned to each expert (before dispatch
                     drops; the dispatch reports its own drop fraction)
  dropped_fraction   fraction of tokens the router gave no expert (nonzero only for expert
                     choice; capacity drops of token choice happen in dispatch)
  router_entropy     mean over tokens of the entropy of p
The per-token routing distribution p is softmax(logits) for softmax routers and, as our
choice for sigmoid routers, the normalised scores sigmoid(l_i) / sum_j sigmoid(l_j).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Routing:
  token: jax.Array  # int32 [G, P]
  expert: jax.Array  # int32 [G, P]
  weight: jax.Array  # float32 [G, P]
  valid: jax.Array  # bool [G, P]
  num_experts: int = flax.struct.field(pytree_node=False)  # E
  group_size: int = flax.struct.field(pytree_node=False)  # S
  # Static bounds a router may know (moe/modality.py): valid pairs of one expert / of all
  # experts in a routing group (None: not known, dispatch uses its own).
  max_per_expert: int | None = flax.struct.field(pytree_node=False, default=None)
  max_valid: int | None = flax.struct.field(pytree_node=False, default=None)


Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Static router settings (hashable: usable as a static argument of jit)."""
  name: str = 'topk_softmax'  # a key of ROUTERS
  k: int = 2  # experts per token; token choice only (expert choice ignores it)
  capacity_factor: float | None = 1.0  # c; None = dropless (token choice only)
  renormalize: bool = False  # token choice: rescale each token's k weights to sum to 1
  jitter: float = 0.0  # eps of x * U(1-eps, 1+eps) on the router input; layer, train only
  load_balance_coef: float = 0.01  # alpha of the Switch loss (use 0 for expert choice)
  z_loss_coef: float = 1e-3  # beta of the router z-loss

  @property
  def expert_choice(self) -> bool:
    return self.name in EXPERT_CHOICE

  def capacity(self, group_size: int, num_experts: int) -> int | None:
    """Tokens per expert per group C; None for dropless token choice."""
    if self.capacity_factor is None:
      return None
    k = 1 if self.expert_choice else self.k
    return capacity(group_size, num_experts, k, self.capacity_factor)


def capacity(group_size: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """C = ceil(c * k * S / E), clipped to [1, S]. Expert choice passes k = 1.

  The quotient is rounded to 9 decimals before the ceiling so that float error in e.g.
  1.1 * 100 / 11 = 10.000000000000002 does not add a slot.
  """
  if capacity_factor is None or capacity_factor <= 0:
    raise ValueError(f'capacity_factor must be > 0, got {capacity_factor!r}')
  c = math.ceil(round(capacity_factor * k * group_size / num_experts, 9))
  return max(1, min(group_size, c))


def check_router_config(config: RouterConfig, num_experts: int | None = None) -> None:
  """Raises ValueError on a bad config; call it early (before compilation) to fail fast."""
  if config.name not in ROUTERS:
    raise ValueError(f'unknown router {config.name!r}; known: {sorted(ROUTERS)}')
  if config.expert_choice:
    if config.capacity_factor is None:
      raise ValueError(f'{config.name} needs a capacity_factor (it sets the tokens per '
                       'expert); None (dropless) is for token-choice routers')
    if config.renormalize:
      raise ValueError(f'{config.name}: renormalize applies to token-choice routers only '
                       '(expert-choice weights are the raw scores)')
  else:
    if config.k < 1 or (num_experts is not None and config.k > num_experts):
      raise ValueError(f'{config.name}: k must be in [1, num_experts={num_experts}], '
                       f'got k={config.k}')
  if config.capacity_factor is not None and not config.capacity_factor > 0:
    raise ValueError(f'capacity_factor must be > 0 (or None for dropless token choice), '
                     f'got {config.capacity_factor!r}')
  if not 0.0 <= config.jitter < 1.0:
    raise ValueError(f'jitter must be in [0, 1), got {config.jitter!r}')
  if config.load_balance_coef < 0 or config.z_loss_coef < 0:
    raise ValueError('aux loss coefficients must be >= 0, got '
                     f'{config.load_balance_coef!r}, {config.z_loss_coef!r}')


def jitter(x: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
  """Multiplicative router-input noise x * U(1 - eps, 1 + eps) (Switch); train only."""
  if eps == 0:
    return x
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)


def route(config: RouterConfig, logits_GSE: jax.Array,
          token_mask_GS: jax.Array | None = None) -> tuple[Routing, Metrics]:
  """Routes with the router `config.name`; capacity from `config.capacity_factor`.
  `token_mask_GS` (bool, optional): the tokens that take part. Expert choice never picks a
  masked token while an unmasked one is left, and the metrics (aux losses included) average
  over the unmasked tokens only; the caller invalidates the masked tokens' pairs."""
  _, group_size, num_experts = logits_GSE.shape
  check_router_config(config, num_experts)
  return ROUTERS[config.name](
      logits_GSE, k=config.k, capacity=config.capacity(group_size, num_experts),
      renormalize=config.renormalize, load_balance_coef=config.load_balance_coef,
      z_loss_coef=config.z_loss_coef, token_mask=token_mask_GS)


# ---------------------------------------------------------------------------------------
# Scores. Each returns log p (the routing distribution of the metrics) and log score (what
# the weights are made of; for softmax the two coincide). Logs keep ranks and
# renormalisation exact where float32 scores saturate (sigmoid(20) == sigmoid(30) == 1).


def _log_scores(logits_GSE: jax.Array, score: str) -> tuple[jax.Array, jax.Array]:
  if score == 'softmax':
    log_p = jax.nn.log_softmax(logits_GSE, axis=-1)
    return log_p, log_p
  log_s = jax.nn.log_sigmoid(logits_GSE)
  return jax.nn.log_softmax(log_s, axis=-1), log_s


def _token_choice(logits_GSE, *, score: str, batch_priority: bool, k: int,
                  capacity: int | None, renormalize: bool, load_balance_coef: float,
                  z_loss_coef: float, token_mask=None) -> tuple[Routing, Metrics]:
  """Each token picks its k highest-logit experts (descending). `capacity` is unused: the
  dispatch applies it to the pairs, in the priority order set here.

  Plain: token-major (pair s*k + j is token s's j-th choice).
  Batch-prioritised (V-MoE BPR, arXiv 2106.05974): tokens sorted by their top probability,
  highest first (stable: ties keep token order), and pairs choice-major as in V-MoE, so all
  first choices (in that token order) come before all second choices, and so on. Under a
  capacity the least confident tokens lose their slots first, and a token's j-th choice
  never displaces another token's earlier choice.
  """
  del capacity
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  log_p_GSE, log_s_GSE = _log_scores(logits_GSE, score)
  _, expert_GSk = jax.lax.top_k(logits_GSE, k)  # monotone scores: rank logits, exactly
  log_w_GSk = jnp.take_along_axis(log_s_GSE, expert_GSk, axis=-1)
  weight_GSk = jax.nn.softmax(log_w_GSk, -1) if renormalize else jnp.exp(log_w_GSk)
  token_GSk = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (G, S, k))
  if batch_priority:
    top_logp_GS = jnp.take_along_axis(log_p_GSE, expert_GSk[..., :1], axis=-1)[..., 0]
    order_GS = jnp.argsort(-top_logp_GS, axis=-1, stable=True)
    take = lambda a: jnp.swapaxes(jnp.take_along_axis(a, order_GS[..., None], axis=1), 1, 2)
    token_GSk, expert_GSk, weight_GSk = map(take, (token_GSk, expert_GSk, weight_GSk))
  routing = Routing(token=token_GSk.reshape(G, S * k).astype(jnp.int32),
                    expert=expert_GSk.reshape(G, S * k).astype(jnp.int32),
                    weight=weight_GSk.reshape(G, S * k),
                    valid=jnp.ones((G, S * k), jnp.bool_), num_experts=E, group_size=S)
  return routing, _metrics(logits_GSE, log_p_GSE, routing, load_balance_coef, z_loss_coef,
                           token_mask)


def _expert_choice(logits_GSE, *, score: str, k: int, capacity: int | None,
                   renormalize: bool, load_balance_coef: float,
                   z_loss_coef: float, token_mask=None) -> tuple[Routing, Metrics]:
  """Expert choice (Zhou et al. 2022): expert e takes the `capacity` tokens with the highest
  score in column e of its group; weight = that score (never renormalised). P = E*C pairs,
  expert-major (pair e*C + c is expert e's c-th best token). A token gets 0..E experts.
  Not causal: a token's routing depends on the other (later) tokens of its group.
  """
  del k
  if capacity is None or renormalize:
    raise ValueError('expert choice needs a capacity and takes no renormalize')
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  C = capacity
  log_p_GSE, log_s_GSE = _log_scores(logits_GSE, score)
  # Rank softmax columns by log p (exact where small probabilities underflow) and sigmoid
  # columns by the logit itself (monotone, and exact where sigmoid saturates).
  key_GSE = log_s_GSE if score == 'softmax' else logits_GSE
  if token_mask is not None:  # masked tokens rank below every unmasked one
    key_GSE = jnp.where(token_mask[..., None], key_GSE, -jnp.inf)
  _, token_GEC = jax.lax.top_k(jnp.swapaxes(key_GSE, 1, 2), C)
  log_w_GEC = jnp.take_along_axis(jnp.swapaxes(log_s_GSE, 1, 2), token_GEC, axis=-1)
  expert_GEC = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32)[None, :, None], (G, E, C))
  routing = Routing(token=token_GEC.reshape(G, E * C).astype(jnp.int32),
                    expert=expert_GEC.reshape(G, E * C),
                    weight=jnp.exp(log_w_GEC).reshape(G, E * C),
                    valid=jnp.ones((G, E * C), jnp.bool_), num_experts=E, group_size=S)
  return routing, _metrics(logits_GSE, log_p_GSE, routing, load_balance_coef, z_loss_coef,
                           token_mask)


def _metrics(logits_GSE, log_p_GSE, routing: Routing, load_balance_coef: float,
             z_loss_coef: float, token_mask=None) -> Metrics:
  """Averages over the tokens of each group (the unmasked ones where `token_mask`)."""
  G, S, E = logits_GSE.shape
  w_GS = (jnp.ones((G, S), jnp.float32) if token_mask is None
          else token_mask.astype(jnp.float32))
  n_G = jnp.maximum(jnp.sum(w_GS, axis=1), 1.0)
  mean_S = lambda a_GS: jnp.sum(a_GS * w_GS, axis=1) / n_G  # noqa: E731  [G]
  p_GSE = jnp.exp(log_p_GSE)
  top1_GSE = jax.nn.one_hot(jnp.argmax(logits_GSE, axis=-1), E, dtype=jnp.float32)
  f_GE = jnp.einsum('GSE,GS->GE', top1_GSE, w_GS) / n_G[:, None]
  P_GE = jnp.einsum('GSE,GS->GE', p_GSE, w_GS) / n_G[:, None]
  load_balance = jnp.mean(E * jnp.sum(f_GE * P_GE, axis=-1))
  z_loss = jnp.mean(mean_S(jnp.square(jax.nn.logsumexp(logits_GSE, axis=-1))))
  entropy = jnp.mean(mean_S(-jnp.sum(p_GSE * log_p_GSE, axis=-1)))

  valid_GP = routing.valid.astype(jnp.float32)
  count_GE = jax.vmap(lambda e, v: jnp.zeros(E, jnp.float32).at[e].add(v))(
      routing.expert, valid_GP)
  count_E = jnp.sum(count_GE, axis=0)
  expert_load = count_E / jnp.maximum(jnp.sum(count_E), 1.0)
  covered_GS = jax.vmap(lambda t, v: jnp.zeros(S, jnp.float32).at[t].max(v))(
      routing.token, valid_GP)
  dropped = jnp.mean(1.0 - covered_GS)
  return {
      'aux_loss': load_balance_coef * load_balance + z_loss_coef * z_loss,
      'load_balance_loss': load_balance,
      'z_loss': z_loss,
      'expert_load': expert_load,
      'dropped_fraction': dropped,
      'router_entropy': entropy,
  }


Router = Callable[..., tuple[Routing, Metrics]]
# All take (logits_GSE, *, k, capacity, renormalize, load_balance_coef, z_loss_coef).
ROUTERS: dict[str, Router] = {
    'topk_softmax': functools.partial(_token_choice, score='softmax', batch_priority=False),
    'topk_sigmoid': functools.partial(_token_choice, score='sigmoid', batch_priority=False),
    'batch_prioritized': functools.partial(_token_choice, score='softmax',
                                           batch_priority=True),
    'expert_choice': functools.partial(_expert_choice, score='softmax'),
    'expert_choice_sigmoid': functools.partial(_expert_choice, score='sigmoid'),
}
EXPERT_CHOICE = frozenset({'expert_choice', 'expert_choice_sigmoid'})
