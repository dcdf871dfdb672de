"""IMP evaluation (projects/imp/evaluate.py): eval.json `tasks` equals a per-example reference
computed without batching or sharding, and a short run of `configs/imp.py:tiny` (shrunk)
through train.py and eval.py beats chance on every task."""

import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from core import partitioning
from data import shapes
from projects.imp import tasks as imp_tasks
from tests.test_imp_train import small
from projects.imp import evaluate as imp_eval
from projects.imp import train as imp_loop
from training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_helpers_on_hand_made_inputs():
  sim = np.array([[0.9, 0.3, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.5]])
  assert imp_eval.recall_at_1(sim) == 2 / 3  # row 1 prefers column 0
  assert imp_eval.recall_at_1(sim.T) == 2 / 3  # column 1's best row is row 0 -> miss
  assert imp_eval.majority_share(np.array([2, 2, 0, 1, 2])) == 0.6
  assert imp_eval.beats_chance({'metric': 'loss', 'value': 1.0, 'chance': 2.0})
  assert not imp_eval.beats_chance({'metric': 'recall@1', 'value': 0.1, 'chance': 0.1})
  prompts = shapes.kind_prompts()
  assert len(prompts) == len(shapes.TEMPLATES) * 2 * 8 * 9 == len(set(prompts))
  assert all(p.count('{}') == 1 for p in prompts)


def _reference(config, params, graphdef, n):
  """Every metric from one example at a time, unsharded, in numpy float64; and the
  embeddings they come from."""
  params = jax.device_get(params)
  # the model's methods, each jitted (once per input shape) on one device
  jitted = {m: jax.jit(lambda p, *a, m=m: getattr(nnx.merge(graphdef, p), m)(*a)[0])
            for m in ('classify', 'embed_image', 'embed_text', 'caption_logits')}
  model = collections.namedtuple('Model', list(jitted))(
      *[lambda *a, f=f: (f(params, *a),) for f in jitted.values()])
  ref, arrays = {}, {}
  for name, task in imp_loop.task_specs(config).items():
    one = task.copy_and_resolve_references()
    one.batch_size = 1
    rows = list(imp_tasks.make_task_iterator(name, one, config.data, seed=0,
                                             split_key='eval_split', repeat=False,
                                             num_examples=n, labels=True))
    batches = [imp_loop.model_batch(task.kind, r) for r in rows]
    labels = np.array([r['label'][0] for r in rows])
    majority = collections.Counter(labels.tolist()).most_common(1)[0][1] / n
    if task.kind == 'classify':
      pred = [np.argmax(model.classify(b['image'])[0]) for b in batches]
      ref[name] = (np.mean(np.array(pred) == labels), majority)
    elif task.kind == 'contrastive':
      img = np.concatenate([model.embed_image(b['image'])[0] for b in batches])
      txt = np.concatenate([model.embed_text(b['text'], b['text_mask'])[0] for b in batches])
      sim = img.astype(np.float64) @ txt.T.astype(np.float64)
      ref[f'{name}/i2t'] = (np.mean(sim.argmax(1) == np.arange(n)), 1 / n)
      ref[f'{name}/t2i'] = (np.mean(sim.argmax(0) == np.arange(n)), 1 / n)
      classes = []
      for kind in shapes.KINDS:
        embs = []
        for p in config.eval.zeroshot_prompts:
          text = p.format(kind)
          tokens, mask = imp_tasks.encode_caption(text, len(text) + 5)  # own padding
          embs.append(model.embed_text(tokens[None], mask[None] > 0)[0][0])
        mean = np.mean(embs, axis=0)
        classes.append(mean / np.linalg.norm(mean))
      pred = np.argmax(img @ np.array(classes).T, axis=1)
      ref[f'{name}/zeroshot'] = (np.mean(pred == labels), majority)
      arrays[name] = (img, txt, np.array(classes))
    else:
      nll, counts = [], collections.Counter()
      for b in batches:
        logits = np.asarray(model.caption_logits(b['image'], b['text'], b['text_mask'])[0],
                            np.float64)[0]
        keep = np.asarray(b['target_mask'])[0]
        targets = np.asarray(b['targets'])[0][keep]
        logp = logits[keep] - np.log(np.exp(logits[keep]).sum(-1, keepdims=True))
        nll += list(-logp[np.arange(len(targets)), targets])
        counts.update(targets.tolist())
      p = np.array(list(counts.values()), np.float64) / len(nll)
      ref[name] = (np.mean(nll), -(p * np.log(p)).sum())
  return ref, arrays


def test_tasks_equal_a_per_example_reference(data_dir):
  config = small(data_dir)
  config.eval.batch_size, config.eval.num_examples = 8, 20  # 2 batches: 16 examples
  config.eval.zeroshot_prompts = ('a {}', 'the {} in the picture')
  mesh = partitioning.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)
  params = state_lib.init_state(config, layout)['params']
  tasks = imp_eval.evaluate_tasks(config, mesh, layout.graphdef, params)
  ref, arrays = _reference(config, params, layout.graphdef, 16)
  assert sorted(tasks) == sorted(ref) == [
      'caption', 'classify16', 'classify32', 'contrastive/i2t', 'contrastive/t2i',
      'contrastive/zeroshot']
  for name, (value, chance) in ref.items():
    entry = tasks[name]
    assert entry['examples'] == 16, (name, entry)
    np.testing.assert_allclose(entry['value'], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(entry['chance'], chance, rtol=1e-6, err_msg=name)
  assert {tasks[n]['metric'] for n in tasks} == {'accuracy', 'recall@1', 'loss'}
  # A random model's scores are near chance, so also compare what they are computed from.
  runner = imp_eval._Runner(config, mesh, layout.graphdef, params)  # pylint: disable=protected-access
  img, txt, classes = arrays['contrastive']
  with jax.set_mesh(mesh):
    (img_b, txt_b, _), _ = runner.run(runner.embed, 'contrastive', config.tasks.contrastive)
    classes_b = runner.prompts(list(shapes.KINDS))
  for got, want in ((img_b, img), (txt_b, txt), (classes_b, classes)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_tiny_trains_end_to_end_and_beats_chance_on_every_task(data_dir, tmp_path):
  """configs/imp.py:tiny with a 2-layer, 64-wide encoder and captions cut to 48 tokens, all
  four tasks, 800 AGD steps (one run: zero-shot 0.38, classification 0.57 / 0.80)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}  # one CPU device
  args = ['--config=configs/imp.py:tiny', f'--workdir={tmp_path}',
          f'--config.data.data_dir={data_dir}', '--config.model.num_layers=2',
          '--config.model.embed_dim=64', '--config.model.head_dim=16',
          '--config.model.mlp_dim=128', '--config.eval.num_examples=512',
          '--config.tasks.contrastive.text_len=48', '--config.tasks.caption.text_len=48']
  for script, extra in (('train.py', ['--config.total_steps=800', '--config.log_every=100',
                                       '--config.checkpoint_every=800']), ('eval.py', [])):
    out = subprocess.run([sys.executable, script, *args, *extra], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / 'eval.json') as f:
    report = json.load(f)
  assert report['step'] == 800
  tasks = report['tasks']
  assert len(tasks) == 6 and all(imp_eval.beats_chance(e) for e in tasks.values()), tasks
  for name, e in tasks.items():  # with a margin: the 512 examples' noise is ~0.02
    if e['metric'] == 'accuracy':
      assert e['value'] > e['chance'] + 0.08, (name, e)
    elif e['metric'] == 'recall@1':
      assert e['value'] > 20 * e['chance'], (name, e)
    else:
      assert e['value'] < 0.5 * e['chance'], (name, e)
  assert os.path.exists(tmp_path / 'task_curves.png')


def test_a_dataset_without_labels_gets_retrieval_but_no_zero_shot(data_dir):
  config = small(data_dir, **{'data.label_key': '', 'eval.batch_size': 8,
                              'eval.num_examples': 16})
  for name in ('caption', 'classify16', 'classify32'):
    del config.tasks[name]
  mesh = partitioning.make_mesh(config.mesh)
  layout = state_lib.state_layout(config, mesh)
  params = state_lib.init_state(config, layout)['params']
  tasks = imp_eval.evaluate_tasks(config, mesh, layout.graphdef, params)
  assert sorted(tasks) == ['contrastive/i2t', 'contrastive/t2i']
  assert all(e['examples'] == 16 and e['chance'] == 1 / 16 for e in tasks.values())
