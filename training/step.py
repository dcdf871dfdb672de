"""Loss, train step and eval step (pure functions; the loop jits them with shardings).

Loss (stage 'main') = masked next-token cross-entropy over all modalities (mean over
unmasked tokens) + the sum of the model's auxiliary losses (`aux` keys ending in `aux_loss`,
already weighted by their config coefficients). Per-modality loss and accuracy are reported
by the modality of the TARGET token.

Loss (stage 'aux', MoMa) = the mean over layers of the auxiliary routers' BCE against the
batch routing (`aux` keys ending in `aux_router_loss`); the main model is frozen by the
optimizer (training/state.py), and the cross-entropy is still reported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_stats(logits_BTV, batch, num_modalities: int):
  """Per-modality sums: {'loss_sum', 'correct', 'count'}, each float32 [M]."""
  targets, mask = batch['targets'], batch['loss_mask'].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit = jnp.take_along_axis(logits_BTV, targets[..., None], axis=-1)[..., 0]
  nll = logz - target_logit
  correct = (jnp.argmax(logits_BTV, axis=-1) == targets).astype(jnp.float32)
  onehot = jax.nn.one_hot(batch['target_modality'], num_modalities, dtype=jnp.float32)
  w = onehot * mask[..., None]  # [B, T, M]
  return {'loss_sum': jnp.einsum('BT,BTM->M', nll, w),
          'correct': jnp.einsum('BT,BTM->M', correct, w),
          'count': w.sum(axis=(0, 1))}


def aux_loss_total(aux: dict) -> jax.Array:
  terms = [v for k, v in aux.items() if k.endswith('aux_loss')]
  return sum(terms, jnp.zeros((), jnp.float32))


def aux_router_loss(aux: dict) -> jax.Array:
  terms = [v for k, v in aux.items() if k.endswith('aux_router_loss')]
  if not terms:
    raise ValueError("stage 'aux' needs a model with auxiliary routers (MoMa with "
                     'expert-choice groups of more than one expert, or MoD)')
  return sum(terms) / len(terms)


def loss_fn(params, graphdef, batch, num_modalities: int, rng=None, stage: str = 'main'):
  model = nnx.merge(graphdef, params)
  logits, aux = model(batch, rng)
  stats = token_stats(logits, batch, num_modalities)
  ce = stats['loss_sum'].sum() / jnp.maximum(stats['count'].sum(), 1.0)
  if stage == 'aux':
    return aux_router_loss(aux), (ce, stats, aux)
  return ce + aux_loss_total(aux), (ce, stats, aux)


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def train_step(state, batch, *, graphdef, tx: optax.GradientTransformation,
               num_modalities: int, seed: int = 0, stage: str = 'main'):
  """One optimizer step. Returns the new state and scalar/vector metrics (on device).

  Stochastic parts of the model (router jitter) draw from fold_in(key(seed), step), so a
  resumed run repeats exactly what the uninterrupted one would have done.
  """
  rng = jax.random.fold_in(jax.random.key(seed), state['step'])
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (ce, stats, aux)), grads = grad_fn(state['params'], graphdef, batch, num_modalities,
                                            rng, stage)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = {
      'loss': loss, 'ce_loss': ce, **stats,
      'grad_norm': _global_norm(grads), 'update_norm': _global_norm(updates),
      'param_norm': _global_norm(params),
      **{f'aux/{k}': v for k, v in aux.items()},  # e.g. aux/layer_1/expert_load [E]
  }
  new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
  return new_state, metrics


def eval_step(params, batch, *, graphdef, num_modalities: int, causal: bool = False):
  """Per-modality loss/accuracy sums of one batch, plus the model's aux metrics.
  `causal`: MoMa routes with its auxiliary routers (the decode-time function)."""
  model = nnx.merge(graphdef, params)
  logits, aux = model(batch, causal=causal)
  return token_stats(logits, batch, num_modalities), aux
