"""IMP evaluation (configs/imp.py): every task of the config on the eval split, at that
task's own resolution and text length -> eval.json `tasks`.

  {"step": N,
   "tasks": {"classify32":               {"metric": "accuracy", "value", "chance", "examples"},
             "contrastive/zeroshot":     {"metric": "accuracy", ...},
             "contrastive/i2t":          {"metric": "recall@1", ...},
             "contrastive/t2i":          {"metric": "recall@1", ...},
             "caption":                  {"metric": "loss", ...}},
   "attention": {"sink_share", "max_activation", "task"}}   (`attention_stats`)

Per task kind:
  classify     top-1 accuracy of the task's classifier head.
  contrastive  zero-shot classification: each image is given the class whose prompt
               embedding (config.eval.zeroshot_prompts, e.g. 'a {}', filled with the
               dataset's label names and averaged over prompts as CLIP does) is nearest;
               and retrieval recall@1 among all evaluated pairs, image->text and
               text->image (a hit is the example's own caption / image).
  caption      caption loss: next-token cross-entropy (nats) over the caption tokens after
               [BOS] (the [EOS] included), given the image.
`chance` is the best input-blind score: the eval split's most frequent class share for
accuracies, 1/N for recall@1 among N pairs, and the unigram entropy of the caption tokens
(the loss of the best context-free predictor) for the loss, where lower is better.
The eval split is read in order, `config.eval.num_examples` (0: all) examples in batches of
`config.eval.batch_size`, the last partial batch dropped; `examples` says how many counted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from core import partitioning
from projects.imp import losses as imp_losses
from projects.imp import tasks as imp_tasks
from projects.imp import train as imp_loop
from projects.imp.validate import validate
from training import plots
from training.evaluate import attention_report, restore_latest, unigram_entropy, write_report

HIGHER_IS_BETTER = {'accuracy': True, 'recall@1': True, 'loss': False}


def beats_chance(entry: dict) -> bool:
  """Whether an eval.json `tasks` entry is better than its chance level."""
  if HIGHER_IS_BETTER[entry['metric']]:
    return entry['value'] > entry['chance']
  return entry['value'] < entry['chance']


def _entry(metric: str, value, chance, examples: int) -> dict:
  return {'metric': metric, 'value': float(value), 'chance': float(chance),
          'examples': int(examples)}


def majority_share(labels: np.ndarray) -> float:
  return float(np.bincount(labels).max() / len(labels))


def recall_at_1(sim_NN: np.ndarray) -> float:
  """Share of rows whose highest-scoring column is their own (the diagonal)."""
  return float(np.mean(np.argmax(sim_NN, axis=1) == np.arange(sim_NN.shape[0])))


# ---------------------------------------------------------------------------
# Jitted per-batch functions; their outputs are replicated, so every process gets the
# whole (global) batch's results in order.


def _classify(params, batch, *, graphdef, head: str):
  model = nnx.merge(graphdef, params)
  logits, _ = model.classify(imp_loop.model_batch('classify', batch)['image'], head=head)
  return jnp.argmax(logits, axis=-1), batch['label']


def _embed(params, batch, *, graphdef):
  model = nnx.merge(graphdef, params)
  b = imp_loop.model_batch('contrastive', batch)
  img, _ = model.embed_image(b['image'])
  txt, _ = model.embed_text(b['text'], b['text_mask'])
  labels = batch.get('label', jnp.zeros(img.shape[:1], jnp.int32))  # 0s: no label feature
  return img, txt, labels


def _embed_text(params, text, mask, *, graphdef):
  model = nnx.merge(graphdef, params)
  return model.embed_text(text, mask > 0)[0]


def _caption(params, batch, *, graphdef, vocab_size: int):
  model = nnx.merge(graphdef, params)
  b = imp_loop.model_batch('caption', batch)
  _, metrics = imp_losses.task_loss(model, 'caption', b)
  n = metrics['num_tokens']
  weights = b['target_mask'].ravel().astype(jnp.float32)
  counts = jnp.bincount(b['targets'].ravel(), weights=weights, length=vocab_size)
  return metrics['task_loss'] * n, n, counts


def _attention(params, batch, *, graphdef, kind: str):
  """The image encoder with `attention_stats` on: sums for eval.json `attention` (sink
  share: attention on patch 0 from the other patches, over heads and layers; the residual
  stream's peak |x|), keyed as transformer.ATTENTION_STATS."""
  model = nnx.merge(graphdef, params)
  model.set_attributes(attention_stats=True, raise_if_not_found=False)
  image = imp_loop.model_batch(kind, batch)['image']
  _, sown = nnx.capture(lambda m, x: m.encode_image(x), nnx.Intermediate)(model, image)
  total = count = peak = jnp.zeros((), jnp.float32)
  for path, variable in nnx.to_flat_state(sown):
    for value in variable.get_value():
      if path[-1] == 'sink':  # [B, N]: queries after the first
        total, count = total + jnp.sum(value[:, 1:]), count + value[:, 1:].size
      elif path[-1] == 'peak':
        peak = jnp.maximum(peak, value)
  return total[None], count[None], peak[None]


class _Runner:
  """Reads a task's eval batches and runs the jitted functions on them."""

  def __init__(self, config, mesh, graphdef, params):
    self.config, self.params = config, params
    self.batch_sh = partitioning.batch_sharding(mesh)
    self.replicated = NamedSharding(mesh, P())
    jit = lambda f, **kw: jax.jit(functools.partial(f, graphdef=graphdef, **kw),
                                  out_shardings=self.replicated)
    self.classify = {h: jit(_classify, head=h) for h in config.model.imp.classifiers}
    self.embed, self.embed_text = jit(_embed), jit(_embed_text)
    self.caption = jit(_caption, vocab_size=config.model.vocab_size)

  def batches(self, name, task, labels: bool):
    task = ml_collections.ConfigDict(task.to_dict())
    task.batch_size = self.config.eval.batch_size
    it = imp_tasks.make_task_iterator(
        name, task, self.config.data, seed=0, split_key='eval_split', repeat=False,
        num_examples=self.config.eval.num_examples or None, labels=labels,
        process_index=jax.process_index(), process_count=jax.process_count())
    for batch in it:
      yield {k: jax.make_array_from_process_local_data(self.batch_sh, v)
             for k, v in batch.items()}

  def run(self, fn, name, task, sums=False, labels=False):
    """-> (fn's outputs over the eval batches, concatenated along the batch or, with
    `sums`, summed; the number of examples). `labels`: the batches carry 'label'."""
    outs = [jax.device_get(fn(self.params, b)) for b in self.batches(name, task, labels)]
    if not outs:
      raise ValueError(f'task {name!r}: the eval split has fewer than one batch of '
                       f'config.eval.batch_size={self.config.eval.batch_size} examples')
    joined = [np.sum(xs, axis=0) if sums else np.concatenate(xs) for xs in zip(*outs)]
    return joined, len(outs) * self.config.eval.batch_size

  def prompts(self, class_names) -> np.ndarray:
    """-> [K, proj_dim] class embeddings: the mean over prompts of the L2-normalised prompt
    embeddings, renormalised (CLIP's prompt ensembling)."""
    templates = list(self.config.eval.zeroshot_prompts)
    texts = [t.format(n) for n in class_names for t in templates]
    length = min(max(len(t.encode('utf-8')) for t in texts) + 2,
                 self.config.model.imp.max_text_len)
    tokens, masks = zip(*(imp_tasks.encode_caption(t, length) for t in texts))
    put = lambda x: jax.make_array_from_process_local_data(self.replicated, np.stack(x))
    emb = np.asarray(jax.device_get(self.embed_text(self.params, put(tokens), put(masks))))
    emb = emb.reshape(len(class_names), len(templates), -1).mean(1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def evaluate_tasks(config, mesh, graphdef, params) -> dict:
  """-> eval.json's `tasks` (module docstring) for every task of `config`."""
  runner = _Runner(config, mesh, graphdef, params)
  heads = imp_loop.task_heads(config)
  out = {}
  with jax.set_mesh(mesh):
    for name, task in imp_loop.task_specs(config).items():
      logging.info('evaluating IMP task %s (%s)', name, task.kind)
      fn = {'classify': runner.classify.get(heads.get(name)), 'contrastive': runner.embed,
            'caption': runner.caption}[task.kind]
      names = (imp_tasks.class_names(config.data, task) if task.kind == 'contrastive'
               else None)  # zero-shot needs the dataset's label names
      outputs, n = runner.run(fn, name, task, sums=task.kind == 'caption',
                              labels=task.kind == 'classify' or bool(names))
      if task.kind == 'classify':
        pred, labels = outputs
        out[name] = _entry('accuracy', np.mean(pred == labels), majority_share(labels), n)
      elif task.kind == 'contrastive':
        img, txt, labels = (np.asarray(x, np.float64) for x in outputs)
        sim = img @ txt.T
        if names:
          pred = np.argmax(img @ runner.prompts(names).T, axis=-1)
          labels = labels.astype(np.int64)
          out[f'{name}/zeroshot'] = _entry('accuracy', np.mean(pred == labels),
                                           majority_share(labels), n)
        out[f'{name}/i2t'] = _entry('recall@1', recall_at_1(sim), 1 / n, n)
        out[f'{name}/t2i'] = _entry('recall@1', recall_at_1(sim.T), 1 / n, n)
      else:
        loss_sum, tokens, counts = outputs
        out[name] = _entry('loss', loss_sum / tokens, unigram_entropy(counts), n)
  return out


def attention_stats(config, mesh, graphdef, params) -> dict:
  """eval.json `attention` (docs/gates.md), for gated and ungated encoders alike: the image
  encoder's sink share (attention on patch 0 from the other patches, averaged over heads,
  layers and queries) and the residual stream's peak |x|, on the first task's eval images
  (`task` names it)."""
  runner = _Runner(config, mesh, graphdef, params)
  name, task = next(iter(imp_loop.task_specs(config).items()))
  fn = jax.jit(functools.partial(_attention, graphdef=graphdef, kind=task.kind),
               out_shardings=runner.replicated)
  with jax.set_mesh(mesh):
    (sink, count, peak), _ = runner.run(fn, name, task)
  return {**attention_report({'attention/sink_sum': float(sink.sum()),
                              'attention/sink_count': float(count.sum()),
                              'attention/max_activation': float(peak.max())}),
          'task': name}



def evaluate(config, workdir: str) -> dict:
  """IMP's eval.py: every task of the newest checkpoint in WORKDIR -> eval.json `tasks` and
  task_curves.png."""
  validate(config, jax.device_count())
  mesh, layout, state, step = restore_latest(config, workdir)
  report = {'step': step,
            'tasks': evaluate_tasks(config, mesh, layout.graphdef, state['params']),
            'attention': attention_stats(config, mesh, layout.graphdef, state['params'])}
  write_report(workdir, report)
  if jax.process_index() == 0:
    plots.plot_task_curves(workdir)
  return report
