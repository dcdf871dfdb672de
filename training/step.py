"""Loss, train step and eval step (pure functions; the loop jits them with shardings).

The loss is the stage's (training/stages.py) from LOSSES:
  'lm' (stage main)        masked next-token cross-entropy over all modalities (mean over
                           unmasked tokens) + the sum of the model's auxiliary losses (`aux`
                           keys ending in `aux_loss`, already weighted by their coefficients)
  'aux_router' (stage aux) the mean over layers of the auxiliary routers' BCE against the
                           batch routing (`aux` keys ending in `aux_router_loss`); the main
                           model is frozen by the optimizer (training/state.py), and the
                           cross-entropy is still reported.
Per-modality loss and accuracy are reported by the modality of the TARGET token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from data import tokenizer
from training import stages


def _nll(logits_BTV, targets_BT):
  logz = jax.nn.logsumexp(logits_BTV, axis=-1)
  return logz - jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]


def _weights(batch, num_modalities: int):
  """[B, T, M]: 1 where the target is real and of modality m."""
  onehot = jax.nn.one_hot(batch['target_modality'], num_modalities, dtype=jnp.float32)
  return onehot * batch['loss_mask'].astype(jnp.float32)[..., None]


def token_stats(logits_BTV, batch, num_modalities: int):
  """Per-modality sums: {'loss_sum', 'correct', 'count'}, each float32 [M]."""
  targets = batch['targets']
  nll = _nll(logits_BTV, targets)
  correct = (jnp.argmax(logits_BTV, axis=-1) == targets).astype(jnp.float32)
  w = _weights(batch, num_modalities)
  return {'loss_sum': jnp.einsum('BT,BTM->M', nll, w),
          'correct': jnp.einsum('BT,BTM->M', correct, w),
          'count': w.sum(axis=(0, 1))}


def floor_stats(logits_BTV, batch, num_modalities: int):
  """Sums per modality and order ([M, O], O = 0 text first, 1 image first: whether the
  sequence's second token is BOI) for the excess over `batch['floor']` (data/floor.py):
  loss, floor, count, and the per-sequence sums a standard error clustered by sequence
  needs: rows (sequences with a token), d2 = sum of d_b^2, dn = sum of d_b n_b, n2 = sum of
  n_b^2, for d_b the sequence's summed excess and n_b its token count."""
  nll = _nll(logits_BTV, batch['targets'])
  w = _weights(batch, num_modalities)
  image_first = batch['tokens'][:, 1] == tokenizer.BOI
  order = jax.nn.one_hot(image_first.astype(jnp.int32), 2, dtype=jnp.float32)  # [B, O]
  f = batch['floor'].astype(jnp.float32)
  d_BM = jnp.einsum('BT,BTM->BM', nll - f, w)
  n_BM = w.sum(axis=1)
  per_order = lambda x_BM: jnp.einsum('BM,BO->MO', x_BM, order)  # noqa: E731
  return {'loss_sum': per_order(jnp.einsum('BT,BTM->BM', nll, w)),
          'floor_sum': per_order(jnp.einsum('BT,BTM->BM', f, w)),
          'count': per_order(n_BM), 'rows': per_order((n_BM > 0).astype(jnp.float32)),
          'd2': per_order(d_BM ** 2), 'dn': per_order(d_BM * n_BM),
          'n2': per_order(n_BM ** 2)}


def aux_loss_total(aux: dict) -> jax.Array:
  terms = [v for k, v in aux.items() if k.endswith('aux_loss')]
  return sum(terms, jnp.zeros((), jnp.float32))


def lm_loss(ce, aux: dict) -> jax.Array:
  """Stage 'main': the cross-entropy plus the model's weighted auxiliary losses."""
  return ce + aux_loss_total(aux)


def aux_router_loss(ce, aux: dict) -> jax.Array:
  """Stage 'aux': the mean over layers of the auxiliary routers' BCE."""
  del ce
  terms = [v for k, v in aux.items() if k.endswith('aux_router_loss')]
  if not terms:
    raise ValueError("stage 'aux' needs a model with auxiliary routers (MoMa with "
                     'expert-choice groups of more than one expert, or MoD)')
  return sum(terms) / len(terms)


LOSSES = {'lm': lm_loss, 'aux_router': aux_router_loss}  # training/stages.py `loss`


def loss_fn(params, graphdef, batch, num_modalities: int, rng=None, stage: str = 'main',
            step=None):
  model = nnx.merge(graphdef, params)
  logits, aux = model(batch, rng, step=step)
  stats = token_stats(logits, batch, num_modalities)
  ce = stats['loss_sum'].sum() / jnp.maximum(stats['count'].sum(), 1.0)
  return LOSSES[stages.STAGES[stage].loss](ce, aux), (ce, stats, aux)


def _global_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def train_step(state, batch, *, graphdef, tx: optax.GradientTransformation,
               num_modalities: int, seed: int = 0, stage: str = 'main'):
  """One optimizer step. Returns the new state and scalar/vector metrics (on device).

  Stochastic parts of the model (router jitter) draw from fold_in(key(seed), step), so a
  resumed run repeats exactly what the uninterrupted one would have done; the model also
  gets the step itself (the dense-to-sparse gates' schedules).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state['step'])
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (ce, stats, aux)), grads = grad_fn(state['params'], graphdef, batch, num_modalities,
                                            rng, stage, state['step'])
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


def eval_step(params, batch, *, graphdef, num_modalities: int, causal: bool = False,
              attention_stats: bool = False, step=None):
  """Per-modality loss/accuracy sums of one batch, plus the model's aux metrics; with a
  `floor` in the batch also `floor_stats` (as 'floor/<name>').
  `causal`: MoMa routes with its auxiliary routers (the decode-time function).
  `attention_stats`: aux also holds the decoder's ATTENTION_STATS (sink, peak activation).
  `step`: the checkpoint's training step (the dense-to-sparse gates' schedules)."""
  model = nnx.merge(graphdef, params)
  logits, aux = model(batch, step=step, causal=causal, attention_stats=attention_stats)
  stats = token_stats(logits, batch, num_modalities)
  if 'floor' in batch:
    stats.update({f'floor/{k}': v for k, v in
                  floor_stats(logits, batch, num_modalities).items()})
  return stats, aux
