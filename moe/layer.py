"""The MoE FFN layer: router + dispatch + stacked experts (+ shared / residual experts).

    x [B, T, D] -> groups [G, S, D] -> logits = x W_r (float32) -> Routing + metrics
      -> dispatch (dropless: sort + ragged_dot | capacity: padded buffers)
      -> experts (on one device, or expert-parallel over the mesh axis 'expert')
      -> combine -> y [B, T, D] (x routed_scale)  (+ shared experts) (+ PR-MoE residual mix)

Routing groups are `group_size` consecutive tokens of the flattened batch (0 = one sequence
per group), a property of the data, so the function is the same on every mesh. Under
expert parallelism (mesh axis `expert` > 1) a dropless layer sends only its real rows with
a ragged all-to-all on GPU/TPU; elsewhere (CPU) and for capacity dispatch the padded
all_to_all path of moe/parallel.py runs, a dropless layer then with capacity = group size
(no token can be dropped). Either way the result equals the single-device one.

Returns `(y, aux)`; aux holds `aux_loss` (already weighted: it is added to the training
loss), the router metrics and the dispatch stats; with `clone_groups` g > 0 (experts that are
clones: fine-grained upcycling, models/upcycle.py) also `clone_cofire` and `slice_coverage`
(`clone_metrics`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from core import layers, partitioning
from core.partitioning import constrain
from moe import dispatch, parallel, routing
from moe.experts import Experts

DISPATCH = ('dropless', 'capacity')


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """Settings of one MoE layer (built from `config.model.moe`)."""
  num_experts: int  # E
  mlp_dim: int  # F of each expert
  router: routing.RouterConfig = routing.RouterConfig()
  dispatch: str = 'dropless'  # 'dropless' | 'capacity'
  group_size: int = 0  # tokens per routing group; 0 = one sequence
  num_shared_experts: int = 0  # always-on SwiGLU experts added to the routed output
  residual: bool = False  # PR-MoE: y = a0 * MoE(x) + a1 * MLP(x), [a0, a1] = softmax(x W)
  grouped_impl: str = 'auto'  # dropless kernel (moe/grouped.py)
  routed_scale: float = 1.0  # the routed experts' output times this (DeepSeek's
  # routed_scaling_factor; g under fine-grained upcycling, where k weights of 1/k add to 1/g)
  clone_groups: int = 0  # g > 0: expert e is a clone of e % g (fine-grained upcycling's
  # slices); the layer reports how often a token's experts hold two clones; 0 = off
  spawn_noise: float = 0.0  # upcycling only (models/upcycle.py): each expert's copied
  # weights plus N(0, (spawn_noise * std of the source matrix)^2) noise; 0 = exact copies


def check_moe_spec(spec: MoESpec, *, seq_len: int, expert_shards: int) -> None:
  """Clear errors before compilation."""
  if spec.dispatch not in DISPATCH:
    raise ValueError(f'model.moe.dispatch={spec.dispatch!r} is not one of {DISPATCH}')
  if spec.dispatch == 'dropless' and spec.router.expert_choice:
    raise ValueError(f'{spec.router.name}: expert-choice routing has a capacity by '
                     "definition: use model.moe.dispatch='capacity'")
  routing.check_router_config(spec.router, spec.num_experts)
  if spec.dispatch == 'capacity' and spec.router.capacity_factor is None:
    raise ValueError("model.moe.dispatch='capacity' needs model.moe.capacity_factor > 0")
  if spec.num_experts % expert_shards:
    raise ValueError(f'model.moe.num_experts={spec.num_experts} is not divisible by '
                     f'mesh.expert={expert_shards}')
  if spec.clone_groups < 0 or (spec.clone_groups and spec.num_experts % spec.clone_groups):
    raise ValueError(f'model.moe.num_experts={spec.num_experts} is not a multiple of '
                     f'model.moe.slices={spec.clone_groups} (each slice has E/g clones)')
  if spec.group_size < 0 or (spec.group_size and seq_len % spec.group_size
                             and spec.group_size % seq_len):
    raise ValueError(f'model.moe.group_size={spec.group_size} must be 0, divide '
                     f'seq_len={seq_len}, or be a multiple of it')


class MoELayer(nnx.Module):
  """Routed SwiGLU experts; `__call__(x [B, T, D]) -> (y [B, T, D], aux)`."""

  def __init__(self, spec: MoESpec, *, embed_dim: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.spec = spec
    self.dtype = dtype  # compute dtype of the expert matmuls
    self.router = partitioning.param(rngs, nnx.initializers.normal(embed_dim ** -0.5 * 0.1),
                               (embed_dim, spec.num_experts), ('embed', None), param_dtype)
    self.experts = Experts(num_experts=spec.num_experts, embed_dim=embed_dim,
                           mlp_dim=spec.mlp_dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs, grouped_impl=spec.grouped_impl)
    self.shared = (layers.SwiGLU(embed_dim=embed_dim,
                                 mlp_dim=spec.mlp_dim * spec.num_shared_experts,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                   if spec.num_shared_experts else None)
    r = spec.router
    if r.name == 'activation_gate':  # softmax(act(x W_r + b) / tau): the gate's bias b
      self.router_bias = partitioning.param(rngs, nnx.initializers.zeros, (spec.num_experts,),
                                            (None,), param_dtype)
    if r.learned_temperature:  # log tau, a scalar per layer, initialised to log(router.tau)
      self.log_temperature = partitioning.param(
          rngs, nnx.initializers.constant(math.log(r.tau)), (), (), param_dtype)
    if spec.residual:
      self.residual_mlp = layers.SwiGLU(embed_dim=embed_dim, mlp_dim=spec.mlp_dim,
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.residual_mix = partitioning.param(rngs, nnx.initializers.zeros, (embed_dim, 2),
                                       ('embed', None), param_dtype)

  def _groups(self, x_BTD):
    B, T, D = x_BTD.shape
    S = self.spec.group_size or T
    return x_BTD.reshape(B * T // S, S, D)

  def __call__(self, x_BTD: jax.Array, rng=None,
               token_mask_BT: jax.Array | None = None, *, decoding: bool = False):
    """`rng`: a key or a `routing.Draw` (key and training step). Its key (training only)
    drives router jitter and evomoe's Gumbel noise, None = deterministic routing; its step
    drives the dense-to-sparse gates' schedules (None: their end).
    `token_mask_BT` (bool): only these tokens are routed (MoT's one-modality MoE); the
    others get 0 from the layer. Expert-choice routers never pick a masked token while an
    unmasked one is left, and the router metrics and aux losses average over the unmasked
    tokens only. `decoding` (token-choice routers; models/generate.py): each token is
    routed alone and nothing is dropped, whatever the dispatch, so a token's output never
    depends on the others: the function of a dropless layer, computed on the new tokens of
    a decoding step (a capacity-dispatch layer's full pass may drop tokens decoding keeps)."""
    B, T, D = x_BTD.shape
    x = x_BTD if decoding else self._groups(x_BTD)
    key = None if decoding else routing.key_of(rng)
    r_in = x.astype(jnp.float32)
    if key is not None and self.spec.router.jitter > 0:
      r_in = routing.jitter(r_in, key, self.spec.router.jitter)
    logits = jnp.einsum('GSD,DE->GSE', r_in, self.router[...].astype(jnp.float32))
    mask = None if token_mask_BT is None else token_mask_BT.reshape(x.shape[:2])
    route, metrics = self._route(logits, mask, key, None if decoding else routing.step_of(rng))
    if mask is not None:
      valid = route.valid & jnp.take_along_axis(mask, route.token, axis=1)
      route = route.replace(valid=valid, weight=jnp.where(valid, route.weight, 0.0))
    if self.spec.clone_groups:
      metrics = {**metrics, **clone_metrics(route, self.spec.clone_groups)}
    if decoding:
      y, stats = run_experts(x, route, self.experts, dropless=True, capacity=T,
                             dtype=self.dtype)
    else:
      y, stats = self._dispatch(x, route)
    y = constrain(y.reshape(B, T, D), ('batch', 'length', 'act_embed'))
    if self.spec.routed_scale != 1:
      y = y * jnp.asarray(self.spec.routed_scale, y.dtype)
    if self.shared is not None:
      y = y + self.shared(x_BTD)
    if self.spec.residual:
      mix = jax.nn.softmax(jnp.einsum('BTD,DM->BTM', x_BTD.astype(jnp.float32),
                                      self.residual_mix[...].astype(jnp.float32)), axis=-1)
      y = (mix[..., :1] * y + mix[..., 1:] * self.residual_mlp(x_BTD)).astype(y.dtype)
    return y, {**metrics, **stats}

  def _route(self, logits_GSE, mask_GS, key, step):
    r = self.spec.router
    if not r.gated:
      return routing.route(r, logits_GSE, mask_GS)
    if hasattr(self, 'router_bias'):
      logits_GSE = logits_GSE + self.router_bias[...].astype(jnp.float32)
    log_tau = self.log_temperature[...] if r.learned_temperature else None
    noise_key = None if key is None else jax.random.fold_in(key, 1)  # jitter drew from key
    return routing.route(r, logits_GSE, mask_GS, step=step, key=noise_key, log_tau=log_tau)

  def _dispatch(self, x_GSD, route: routing.Routing):
    spec = self.spec
    S = x_GSD.shape[1]
    capacity = S if spec.dispatch == 'dropless' else spec.router.capacity(S, spec.num_experts)
    return run_experts(x_GSD, route, self.experts, dropless=spec.dispatch == 'dropless',
                       capacity=capacity, dtype=self.dtype)


def clone_metrics(route: routing.Routing, clone_groups: int) -> dict[str, jax.Array]:
  """How often clones fire together, per token (the top-K diagnostic of arXiv 2309.13850:
  over-specified experts are averaged only when top-K reaches several clones of one true
  expert). Expert e is a clone of slice e % g (g = `clone_groups`); over the tokens of
  every routing group (a token's valid pairs):

    clone_cofire    fraction of tokens with two or more experts of one slice
    slice_coverage  mean fraction of the g slices a token's experts cover (1 = the whole
                    dense FFN width, as at an upcycled model's step 0)
  """
  g = clone_groups
  S = route.group_size
  count_GSg = jax.vmap(lambda t, s, v: jnp.zeros((S, g), jnp.float32).at[t, s].add(v))(
      route.token, route.expert % g, route.valid.astype(jnp.float32))
  return {'clone_cofire': jnp.mean(jnp.any(count_GSg >= 2, axis=-1).astype(jnp.float32)),
          'slice_coverage': jnp.mean(jnp.sum(count_GSg > 0, axis=-1) / g)}


def run_experts(x_GSD: jax.Array, route: routing.Routing, experts: Experts, *,
                dropless: bool, capacity: int, dtype, max_valid: int | None = None):
  """y [G, S, D] = sum over the routing's pairs of weight * expert(x); returns (y, stats).

  dropless: every valid pair is computed, and `capacity` must bound the valid pairs of any
  one expert in any one group (S for token choice; the routing's own capacity for routers
  that already cap each expert, like MoMa's group expert choice). Otherwise pairs beyond
  `capacity` per expert and group are dropped first-come (capacity dispatch).

  One device: dropless = sort + grouped matmul, capacity = padded buffers. On a mesh
  without expert parallelism a dropless layer runs the same sort + grouped matmul on each
  device's own groups (`parallel.batch_parallel_dropless`; plain jit would sort the
  global batch on every device) where the batch axes split G, as they do in training. Under expert
  parallelism (mesh axis `expert` > 1) a dropless layer moves only its real rows with a
  ragged all-to-all where `parallel.ragged_exchange()` gives one (GPU/TPU by default;
  `parallel.RAGGED_EP`); otherwise, and for capacity dispatch, the padded all_to_all path
  of moe/parallel.py runs with that capacity, so a dropless layer drops nothing there either.
  `max_valid` (dropless, one device): a static bound on the valid pairs of one group (see
  `dispatch.dropless_dispatch_combine`).
  """
  n_shards = parallel.expert_axis_size()
  if dropless and n_shards == 1:
    if parallel.batch_parallel_applies(x_GSD.shape[0]):  # each device sorts its own groups
      return parallel.batch_parallel_dropless(
          x_GSD, route, experts.w_gate[...], experts.w_up[...], experts.w_down[...],
          experts.dtype, impl=experts.grouped_impl, max_valid=max_valid)
    return dispatch.dropless_dispatch_combine(x_GSD, route, experts, max_valid=max_valid)
  exchange = parallel.ragged_exchange() if dropless else None
  if exchange is not None:
    return parallel.ragged_expert_parallel(
        x_GSD, route, experts.w_gate[...], experts.w_up[...], experts.w_down[...], dtype,
        exchange=exchange, impl=experts.grouped_impl)
  if n_shards == 1:
    expert_fn = experts.dense_apply
  else:
    E, G = experts.num_experts, x_GSD.shape[0]

    def expert_fn(buffers):  # [E, G*C, D] -> [E, G*C, D], experts on their devices
      out = parallel.expert_parallel_swiglu(
          buffers.reshape(E, G, capacity, -1), experts.w_gate[...], experts.w_up[...],
          experts.w_down[...], dtype)
      return out.reshape(E, G * capacity, -1)
  return dispatch.capacity_dispatch_combine(x_GSD, route, expert_fn, capacity, dtype=dtype)
