"""IMP's losses (pure, float32) and tasks: what one AGD step minimises for each task kind,
and which modules of the model each task's loss reaches."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from data import tokenizer
from projects.imp.model import IMPModel, LOG_TEMP_MAX


def _xent(logits, labels):
  """Per-example softmax cross-entropy, float32."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def classification_loss(logits_BK, labels_B):
  """Mean softmax cross-entropy -> (loss, {'loss', 'accuracy'})."""
  loss = _xent(logits_BK, labels_B).mean()
  acc = (jnp.argmax(logits_BK, axis=-1) == labels_B).astype(jnp.float32).mean()
  return loss, {'loss': loss, 'accuracy': acc}


def contrastive_loss(img_BP, txt_BP, log_temp):
  """Symmetric InfoNCE (CLIP): logits = exp(min(log_temp, log 100)) * img @ txt^T, pairs on
  the diagonal; loss = (CE over texts + CE over images) / 2.
  -> (loss, {'loss', 'i2t_recall_at_1', 't2i_recall_at_1', 'logit_scale'})."""
  scale = jnp.exp(jnp.minimum(jnp.asarray(log_temp, jnp.float32), LOG_TEMP_MAX))
  logits = scale * (img_BP.astype(jnp.float32) @ txt_BP.astype(jnp.float32).T)
  labels = jnp.arange(logits.shape[0])
  loss = 0.5 * (_xent(logits, labels).mean() + _xent(logits.T, labels).mean())
  recall = lambda l: (jnp.argmax(l, axis=-1) == labels).astype(jnp.float32).mean()
  return loss, {'loss': loss, 'i2t_recall_at_1': recall(logits),
                't2i_recall_at_1': recall(logits.T), 'logit_scale': scale}


def caption_loss(logits_BTV, targets_BT, mask_BT):
  """Token cross-entropy averaged over mask -> (loss, {'loss', 'token_accuracy',
  'num_tokens'})."""
  m = mask_BT.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  loss = (_xent(logits_BTV, targets_BT) * m).sum() / n
  hit = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return loss, {'loss': loss, 'token_accuracy': (hit * m).sum() / n, 'num_tokens': m.sum()}


def caption_inputs(tokens_BT, pad: int = tokenizer.PAD) -> dict[str, jax.Array]:
  """[BOS] caption [EOS] [PAD]... -> the 'caption' task's text / targets / target_mask."""
  tokens = jnp.asarray(tokens_BT)
  text, targets = tokens[:, :-1], tokens[:, 1:]
  return {'text': text, 'targets': targets, 'target_mask': targets != pad}


# ---------------------------------------------------------------------------
# Tasks.


def _classify(model: IMPModel, batch, rng, head=None):
  logits, aux = model.classify(batch['image'], rng, head)
  return classification_loss(logits, batch['label']) + (aux,)


def _contrastive(model: IMPModel, batch, rng, head=None):  # pylint: disable=unused-argument
  r_img, r_txt = (None, None) if rng is None else jax.random.split(rng)
  img, aux_i = model.embed_image(batch['image'], r_img)
  txt, aux_t = model.embed_text(batch['text'], batch['text_mask'], r_txt)
  aux = {**{f'image/{k}': v for k, v in aux_i.items()},
         **{f'text/{k}': v for k, v in aux_t.items()}}
  return contrastive_loss(img, txt, model.log_temp[...]) + (aux,)


def _caption(model: IMPModel, batch, rng, head=None):  # pylint: disable=unused-argument
  text_mask = batch.get('text_mask')
  logits, aux = model.caption_logits(batch['image'], batch['text'], text_mask, rng)
  return caption_loss(logits, batch['targets'], batch['target_mask']) + (aux,)


TASKS = {'classify': _classify, 'contrastive': _contrastive, 'caption': _caption}
# Keys a batch of each kind must hold (caption may also hold 'text_mask').
TASK_BATCH_KEYS = {
    'classify': ('image', 'label'),
    'contrastive': ('image', 'text', 'text_mask'),
    'caption': ('image', 'text', 'targets', 'target_mask'),
}
# The IMPModel attributes whose parameters a task's loss reaches; all others get zero
# gradient from it (tests/test_imp_model.py checks this). Of `classifiers`, only the task's
# own head (`task_modules`).
TASK_MODULES = {
    'classify': ('image_embed', 'encoder', 'classifiers'),
    'contrastive': ('image_embed', 'text_embed', 'encoder', 'image_proj', 'text_proj',
                    'log_temp'),
    'caption': ('image_embed', 'text_embed', 'encoder', 'caption_head'),
}


def task_modules(kind: str, head: str | None = None) -> tuple[str, ...]:
  """The modules a task's loss reaches, its classifier as 'classifiers/<head>'."""
  return tuple(f'classifiers/{head}' if m == 'classifiers' else m for m in TASK_MODULES[kind])


def task_loss(model: IMPModel, kind: str, batch: dict, rng: jax.Array | None = None,
              head: str | None = None):
  """One AGD step's loss: the task loss of `kind` plus the MoE aux losses; `head` names
  the classifier of a classification task (optional with one head).

  -> (loss, metrics): metrics hold the task's own metrics, 'task_loss', 'moe_aux_loss',
  'loss' (the total) and the MoE layers' router metrics under 'moe/...'.
  """
  if kind not in TASKS:
    raise ValueError(f'unknown IMP task kind {kind!r}; known: {sorted(TASKS)}')
  missing = [k for k in TASK_BATCH_KEYS[kind] if k not in batch]
  if missing:
    raise ValueError(f'IMP task {kind!r}: batch lacks {missing} (has {sorted(batch)})')
  loss, metrics, aux = TASKS[kind](model, batch, rng, head)
  aux_loss = sum((v for k, v in aux.items() if k.endswith('/aux_loss')), jnp.float32(0.0))
  total = loss + aux_loss
  return total, {**metrics, 'task_loss': loss, 'moe_aux_loss': aux_loss, 'loss': total,
                 **{f'moe/{k}': v for k, v in aux.items()}}
