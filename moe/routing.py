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
  evomoe                 EvoMoE's dense-to-sparse gate (arXiv 2112.14397): g = softmax((logits
                         + Gumbel) / tau), the experts of a token's top-k with g > threshold
                         (soft phase), only the top one from `hard_step` on (hard phase), top-1
                         without noise at eval; weights g, not renormalised
  activation_gate        the activation dense-to-sparse gate (arXiv 2401.13875): g =
                         softmax(act(logits) / tau) (the layer adds the bias b to the logits),
                         then top-k, optionally a threshold; weights g (or renormalised)

The two dense-to-sparse gates (`GATED`) take their temperature tau from a schedule of the
training step, or a learned log-temperature the layer owns (`temperature`); a token uses 1..k
experts (pairs past a token's first can be invalid). Token-choice routers return all S*k pairs valid: capacity is applied by the dispatch (or not
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
  experts_per_token  mean over tokens of the token's valid pairs (before dispatch drops)
The gated routers add `temperature` (tau), and their load-balance loss is EvoMoE's
E^2 * mean_e(mean_t g_e * mean_t chosen_e) = E * sum_e P_e f_e with f_e the fraction of tokens
that USE expert e (all their valid pairs, not only the top one) and P_e the mean gate value.
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


@flax.struct.dataclass
class Draw:
  """What a layer's stochastic or scheduled routing gets from the training step, passed
  down the blocks as their `rng` argument (models/transformer.py `Decoder.__call__`):
  `key`, a PRNG key for routing noise (None: no noise, evaluation), and `step`, the int32
  training step of the schedules (None: the schedules' end). Layers read it through
  `key_of` / `step_of`, which also take a bare key (or None), as tests pass."""
  key: jax.Array | None
  step: jax.Array | None

  def fold_in(self, i: int) -> 'Draw':
    return self.replace(key=None if self.key is None else jax.random.fold_in(self.key, i))


def key_of(rng) -> jax.Array | None:
  return rng.key if isinstance(rng, Draw) else rng


def step_of(rng) -> jax.Array | None:
  return rng.step if isinstance(rng, Draw) else None


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
  # The dense-to-sparse gates (GATED routers only; `check_router_config` refuses them on
  # the others):
  temperature: str = 'fixed'  # tau: a key of TEMPERATURES
  tau: float = 1.0  # tau_0: the fixed tau, a schedule's start, a learned tau's init
  tau_min: float = 0.5  # a schedule's end value
  tau_steps: int = 0  # T: a schedule goes from tau to tau_min over steps [0, T]
  threshold: float = 0.0  # a token's experts after its first need g > threshold
  hard_step: int = -1  # evomoe: from this training step on only the top expert; -1 = never
  activation: str = 'identity'  # activation_gate: act, a key of ACTIVATIONS

  @property
  def expert_choice(self) -> bool:
    return self.name in EXPERT_CHOICE

  @property
  def gated(self) -> bool:
    return self.name in GATED

  @property
  def learned_temperature(self) -> bool:
    return self.gated and self.temperature == 'learned'

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
  _check_gate(config)


def _check_gate(config: RouterConfig) -> None:
  defaults = RouterConfig()
  if not config.gated:
    changed = [f for f in GATE_FIELDS if getattr(config, f) != getattr(defaults, f)]
    if changed:
      raise ValueError(f'router {config.name!r} takes no {", ".join(changed)}: those set the '
                       f'dense-to-sparse gates {sorted(GATED)}')
    return
  if config.temperature not in TEMPERATURES:
    raise ValueError(f'{config.name}: unknown temperature {config.temperature!r}; known: '
                     f'{sorted(TEMPERATURES)}')
  if config.name == 'evomoe' and config.activation != 'identity':
    raise ValueError(f"evomoe takes no activation (got {config.activation!r}): it is "
                     "activation_gate's")
  if config.activation not in ACTIVATIONS:
    raise ValueError(f'{config.name}: unknown activation {config.activation!r}; known: '
                     f'{sorted(ACTIVATIONS)}')
  for key in ('tau', 'tau_min'):
    value = getattr(config, key)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f'{config.name}: {key} must be a number > 0, got {value!r}')
  scheduled = config.temperature in ('exponential', 'linear')
  if not isinstance(config.tau_steps, int) or config.tau_steps < (1 if scheduled else 0):
    raise ValueError(f'{config.name}: tau_steps must be an integer >= '
                     f'{1 if scheduled else 0} for temperature={config.temperature!r}, got '
                     f'{config.tau_steps!r}')
  if not 0.0 <= config.threshold < 1.0:
    raise ValueError(f'{config.name}: threshold must be in [0, 1), got {config.threshold!r}')
  if not isinstance(config.hard_step, int) or config.hard_step < -1:
    raise ValueError(f'{config.name}: hard_step must be an integer >= -1 (-1 = never), got '
                     f'{config.hard_step!r}')
  if config.hard_step != -1 and config.name != 'evomoe':
    raise ValueError(f'{config.name}: hard_step is the evomoe gate\'s (got '
                     f'{config.hard_step!r}); use k=1 for a top-1 gate')


def jitter(x: jax.Array, rng: jax.Array, eps: float) -> jax.Array:
  """Multiplicative router-input noise x * U(1 - eps, 1 + eps) (Switch); train only."""
  if eps == 0:
    return x
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)


def route(config: RouterConfig, logits_GSE: jax.Array,
          token_mask_GS: jax.Array | None = None, *, step: jax.Array | None = None,
          key: jax.Array | None = None,
          log_tau: jax.Array | None = None) -> tuple[Routing, Metrics]:
  """Routes with the router `config.name`; capacity from `config.capacity_factor`.
  `token_mask_GS` (bool, optional): the tokens that take part. Expert choice never picks a
  masked token while an unmasked one is left, and the metrics (aux losses included) average
  over the unmasked tokens only; the caller invalidates the masked tokens' pairs.
  The gated routers also take the training `step` (int32 scalar; None: the schedules' end),
  `key` (evomoe's Gumbel noise; None: evaluation, top-1) and `log_tau` (the layer's learned
  log-temperature, for temperature='learned')."""
  _, group_size, num_experts = logits_GSE.shape
  check_router_config(config, num_experts)
  extra = {}
  if config.gated:
    extra = dict(tau=temperature(config, step, log_tau), hard=hard_phase(config, step),
                 key=key, threshold=config.threshold, activation=config.activation)
  return ROUTERS[config.name](
      logits_GSE, k=config.k, capacity=config.capacity(group_size, num_experts),
      renormalize=config.renormalize, load_balance_coef=config.load_balance_coef,
      z_loss_coef=config.z_loss_coef, token_mask=token_mask_GS, **extra)


def temperature(config: RouterConfig, step: jax.Array | None,
                log_tau: jax.Array | None = None) -> jax.Array:
  """tau of a gated router at training step `step` (float32 scalar):

    fixed        tau
    exponential  tau * (tau_min / tau) ** min(t / T, 1)   (= max(tau exp(t ln(tau_min/tau) / T),
                                                            tau_min) when tau_min < tau)
    linear       tau + (tau_min - tau) * min(t / T, 1)
    learned      exp(log_tau), the layer's parameter (initialised to log tau)

  `step` None (decoding, a bare model call): the schedule's end, tau_min."""
  kind = config.temperature
  if kind == 'learned':
    if log_tau is None:
      raise ValueError("temperature='learned' needs the layer's log_tau")
    return jnp.exp(jnp.asarray(log_tau, jnp.float32))
  if kind == 'fixed':
    return jnp.asarray(config.tau, jnp.float32)
  if step is None:
    frac = jnp.ones((), jnp.float32)
  else:
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / config.tau_steps, 1.0)
  tau0, tau1 = jnp.float32(config.tau), jnp.float32(config.tau_min)
  if kind == 'exponential':
    return tau0 * jnp.exp(frac * jnp.log(tau1 / tau0))
  return tau0 + (tau1 - tau0) * frac


def hard_phase(config: RouterConfig, step: jax.Array | None) -> jax.Array:
  """bool scalar: evomoe's hard phase (step >= hard_step); `step` None: whether there is one."""
  if config.hard_step < 0:
    return jnp.zeros((), jnp.bool_)
  if step is None:
    return jnp.ones((), jnp.bool_)
  return jnp.asarray(step) >= config.hard_step


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


def _gated(logits_GSE, *, gumbel: bool, k: int, capacity: int | None, renormalize: bool,
           load_balance_coef: float, z_loss_coef: float, token_mask=None, tau, hard, key,
           threshold: float, activation: str) -> tuple[Routing, Metrics]:
  """The dense-to-sparse gates: g = softmax((act(logits) [+ Gumbel]) / tau), a token's
  top-k experts of g in descending order (pair s*k + j is its j-th), the first always used,
  the j-th (j > 0) only where g > threshold and not in evomoe's hard phase; weights g (or
  renormalised over the used ones). `gumbel` (evomoe): Gumbel(0, 1) noise from `key` in
  training; `key` None = evaluation: the top expert alone, without noise."""
  del capacity
  logits_GSE = logits_GSE.astype(jnp.float32)
  G, S, E = logits_GSE.shape
  scores = ACTIVATIONS[activation](logits_GSE)
  if gumbel and key is not None:
    scores = scores + jax.random.gumbel(key, scores.shape, jnp.float32)
  log_g_GSE = jax.nn.log_softmax(scores / tau, axis=-1)
  log_w_GSk, expert_GSk = jax.lax.top_k(log_g_GSE, k)
  first_k = jnp.arange(k) == 0
  if gumbel and key is None:
    valid_GSk = jnp.broadcast_to(first_k, (G, S, k))
  else:
    valid_GSk = first_k | ((jnp.exp(log_w_GSk) > threshold) & ~hard)
  if renormalize:
    weight_GSk = jax.nn.softmax(jnp.where(valid_GSk, log_w_GSk, -jnp.inf), axis=-1)
  else:
    weight_GSk = jnp.where(valid_GSk, jnp.exp(log_w_GSk), 0.0)
  token_GSk = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (G, S, k))
  routing = Routing(token=token_GSk.reshape(G, S * k), expert=expert_GSk.reshape(G, S * k),
                    weight=weight_GSk.reshape(G, S * k), valid=valid_GSk.reshape(G, S * k),
                    num_experts=E, group_size=S)
  chosen_GSE = jnp.sum(jax.nn.one_hot(expert_GSk, E, dtype=jnp.float32)
                       * valid_GSk[..., None].astype(jnp.float32), axis=2)
  metrics = _metrics(logits_GSE, log_g_GSE, routing, load_balance_coef, z_loss_coef,
                     token_mask, chosen_GSE=chosen_GSE)
  return routing, {**metrics, 'temperature': jnp.asarray(tau, jnp.float32)}


def _metrics(logits_GSE, log_p_GSE, routing: Routing, load_balance_coef: float,
             z_loss_coef: float, token_mask=None, chosen_GSE=None) -> Metrics:
  """Averages over the tokens of each group (the unmasked ones where `token_mask`).
  `chosen_GSE` (gated routers): the experts each token uses, for f of the load balance
  (default: the top-1 of the logits)."""
  G, S, E = logits_GSE.shape
  w_GS = (jnp.ones((G, S), jnp.float32) if token_mask is None
          else token_mask.astype(jnp.float32))
  n_G = jnp.maximum(jnp.sum(w_GS, axis=1), 1.0)
  mean_S = lambda a_GS: jnp.sum(a_GS * w_GS, axis=1) / n_G  # noqa: E731  [G]
  p_GSE = jnp.exp(log_p_GSE)
  top1_GSE = (jax.nn.one_hot(jnp.argmax(logits_GSE, axis=-1), E, dtype=jnp.float32)
              if chosen_GSE is None else chosen_GSE)
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
  pairs_GS = jax.vmap(lambda t, v: jnp.zeros(S, jnp.float32).at[t].add(v))(
      routing.token, valid_GP)
  return {
      'experts_per_token': jnp.mean(mean_S(pairs_GS)),
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
    'evomoe': functools.partial(_gated, gumbel=True),
    'activation_gate': functools.partial(_gated, gumbel=False),
}
EXPERT_CHOICE = frozenset({'expert_choice', 'expert_choice_sigmoid'})
GATED = frozenset({'evomoe', 'activation_gate'})  # take tau, step, key (`route`)
TEMPERATURES = ('fixed', 'exponential', 'linear', 'learned')
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'identity': lambda x: x, 'sigmoid': jax.nn.sigmoid, 'tanh': jnp.tanh,
    'gelu': jax.nn.gelu}
GATE_FIELDS = ('temperature', 'tau', 'tau_min', 'tau_steps', 'threshold', 'hard_step',
               'activation')
