"""The exact Bayes floor (data/floor.py) against brute force: every sequence a shrunk
generator can produce, enumerated with its probability, gives each token's Bayes-optimal
loss by prefix sums (a trie); the structured computation must equal it to 1e-6 per token,
for both datasets, both orders, both codebooks and sequences cut anywhere. Also: the eval
pools floor and loss over the same tokens, and a model that sees the next token is flagged.
"""

import collections

import jax
import numpy as np
import pytest

from data import floor, pipeline, scenes, shapes
from data import tokenizer as tok
from training import evaluate, step as step_lib


def _distribution(paths, patch, codebook, size, p_image_first):
  """{sequence: probability} over every path of a generator and both orders."""
  dist = collections.defaultdict(float)
  for p, image_text in paths:
    image, text = image_text
    codes = tok.encode_image(image, size, patch, codebook)
    for image_first, q in ((False, 1 - p_image_first), (True, p_image_first)):
      if q:
        dist[tuple(tok.build_sequence(tok.encode_bytes(text), codes, image_first))] += p * q
  return dist


def _check(dist, model, p_image_first, num=60, seed=0):
  brute = floor.BruteForce(dist)
  assert sum(dist.values()) == pytest.approx(1.0)
  seqs = list(dist)
  rng = np.random.default_rng(seed)
  for i in rng.choice(len(seqs), min(num, len(seqs)), replace=False):
    seq = np.array(seqs[i])
    want = brute.floor(seq)
    np.testing.assert_allclose(floor.sequence_floor(seq, model, p_image_first), want,
                               atol=1e-6, rtol=0)
    cut = int(rng.integers(2, len(seq)))  # a sequence cut short (seq_len)
    np.testing.assert_allclose(floor.sequence_floor(seq[:cut], model, p_image_first),
                               want[:cut - 1], atol=1e-6, rtol=0)


SHAPES_CASES = [  # (spec, patch, codebook, P(image first))
    (shapes.ShapesSpec(kinds=('square', 'circle'), colors=('red', 'orange'),
                       sizes=('small', 'large'), jitter=0, templates=shapes.TEMPLATES[:2]),
     4, 'rgb64', 0.5),
    (shapes.ShapesSpec(kinds=('plus', 'diamond'), colors=('yellow',), sizes=('small',),
                       jitter=1, templates=shapes.TEMPLATES[3:], two_shape_prob=0.3),
     8, 'palette', 0.5),
    (shapes.ShapesSpec(kinds=('ring',), colors=('white', 'cyan'), sizes=('large',), jitter=1,
                       templates=shapes.TEMPLATES[2:3]), 4, 'rgb64', 1.0),
]


@pytest.mark.parametrize('case', range(len(SHAPES_CASES)))
def test_shapes_floor_equals_brute_force(case):
  spec, patch, codebook, p_if = SHAPES_CASES[case]

  def program(ch):
    objects, jitters, template = shapes.draw_scene(ch, spec)
    return shapes.render(objects, jitters, spec), shapes.caption_of(objects, template,
                                                                    spec).encode()

  paths = [(p, r) for p, r, _ in floor.enumerate_paths(program)]
  dist = _distribution(paths, patch, codebook, 32, p_if)
  _check(dist, shapes.FloorModel(spec, patch, codebook), p_if)


SCENES_CASES = [
    (scenes.ScenesSpec(grid=2, kinds=2, colors=('red', 'blue'), fills=('solid', 'hollow'),
                       count_probs=(0.6, 0.4), offsets=1, p_fill=1.0, p_count=0.0), 4, 0.5),
    (scenes.ScenesSpec(grid=2, kinds=2, colors=('green',), fills=('striped',),
                       count_probs=(0.5, 0.5), offsets=2, p_color=1.0, p_fill=0.0,
                       p_count=0.3), 6, 0.5),
    (scenes.ScenesSpec(grid=2, kinds=1, colors=('pink',), fills=('hollow',),
                       count_probs=(0.2, 0.3, 0.5), offsets=1, p_color=1.0, p_fill=1.0,
                       p_relative=0.7), 4, 0.5),
    (scenes.ScenesSpec(grid=3, kinds=8, colors=('white',), fills=('solid',),
                       count_probs=(0.5, 0.5), offsets=1, p_color=1.0, p_fill=0.0,
                       p_count=0.0, p_relative=0.7), 4, 0.0),
]


@pytest.mark.parametrize('case', range(len(SCENES_CASES)))
def test_scenes_floor_equals_brute_force(case):
  spec, patch, p_if = SCENES_CASES[case]

  def program(ch):
    objects = scenes.draw_scene(ch, spec, scenes.Captions(spec))
    return scenes.render(objects, spec)

  paths = [(p, (image, text)) for p, image, text in floor.enumerate_paths(program)]
  assert len(paths) < 20_000  # keep the brute force quick
  dist = _distribution(paths, patch, 'palette', spec.image_size, p_if)
  _check(dist, scenes.FloorModel(spec, patch, 'palette'), p_if)


def test_sampler_draws_what_the_enumeration_weighs():
  """The examples come from the enumerated distribution: on a shrunk mm_scenes, 4,000
  samples' frequencies match the enumerated probabilities (chi-square)."""
  spec = SCENES_CASES[0][0]
  program = lambda ch: scenes.draw_scene(ch, spec, scenes.Captions(spec))  # noqa: E731
  probs = collections.defaultdict(float)
  for p, objects, text in floor.enumerate_paths(program):
    probs[(text, tuple(objects))] += p
  counts = collections.Counter()
  for i in range(4000):
    ch = floor.Sampler(np.random.default_rng((7, i)))
    objects = program(ch)
    counts[(ch.text, tuple(objects))] += 1
  assert set(counts) <= set(probs)
  # Pool outcomes into 20 bins of about equal probability, then a chi-square test.
  keys = sorted(probs, key=probs.get)
  bins, acc = np.zeros(len(keys), int), 0.0
  for j, k in enumerate(keys):
    acc += probs[k]
    bins[j] = min(int(acc * 20), 19)
  expected = np.bincount(bins, weights=[probs[k] * 4000 for k in keys], minlength=20)
  observed = np.bincount(bins, weights=[counts[k] for k in keys], minlength=20)
  chi2 = ((observed - expected) ** 2 / expected).sum()
  assert chi2 < 45, chi2  # 19 degrees of freedom: p ~ 1e-3


def test_shapes_tokens_tell_sizes_and_positions_apart_not_always_kinds():
  """What the mm_shapes docstring says the tokens can tell apart."""
  model = shapes.FloorModel(shapes.SPEC, 4, 'rgb64')
  groups, renderings = collections.defaultdict(set), []
  for pos in range(9):
    table, region = model.tables[pos], model.regions[pos]
    full = np.zeros((len(table.probs), 64), np.int64)
    full[:, region] = table.codes
    for i, codes in enumerate(full):
      attrs = (table.attrs['kind'][i], table.attrs['color'][i], table.attrs['size'][i], pos)
      groups[codes.tobytes()].add(attrs)
      renderings.append((codes.tobytes(), attrs))
  shared = collections.Counter()
  for key, a in renderings:
    others = [b for b in groups[key] if b != a]
    assert all(b[2] == a[2] and b[3] == a[3] for b in others), others  # size, position
    shared[shapes.SPEC.sizes[a[2]]] += bool(others)
  n = len(renderings) // 2  # renderings per size
  assert round(shared['small'] / n, 3) == 0.326 and round(shared['large'] / n, 3) == 0.005
  assert round((shared['small'] + shared['large']) / (2 * n), 3) == 0.166


def test_eval_pools_floor_and_loss_over_the_same_tokens_and_flags_a_leak(data_dir):
  data_cfg = _shapes_data(data_dir)
  batch = next(iter(pipeline.make_eval_iterator(data_cfg, seq_len=96, batch_size=8,
                                                num_examples=8, with_floor=True)))
  assert batch['floor'].shape == (8, 96)
  assert (batch['floor'][batch['loss_mask'] == 0] == 0).all()
  # The floor of each row is sequence_floor of its sequence (BOS + targets).
  model, p_if = pipeline.floor_model(data_cfg)
  for b in range(8):
    seq = np.concatenate([[tok.BOS], batch['targets'][b][batch['loss_mask'][b] > 0]])
    np.testing.assert_allclose(batch['floor'][b, :len(seq) - 1],
                               floor.sequence_floor(seq, model, p_if), rtol=1e-6)
  vocab = tok.VOCAB_SIZE
  uniform = np.zeros((8, 96, vocab), np.float32)
  leak = 30.0 * jax.nn.one_hot(batch['targets'], vocab)  # logits that see the next token
  for logits, flagged in ((uniform, False), (leak, True)):
    stats = jax.device_get(step_lib.token_stats(logits, batch, 2))
    sums = jax.device_get(step_lib.floor_stats(logits, batch, 2))
    np.testing.assert_allclose(sums['count'].sum(1), stats['count'])  # the same tokens
    np.testing.assert_allclose(sums['loss_sum'].sum(1), stats['loss_sum'], rtol=1e-5)
    report, violations = evaluate.floor_report(sums, tok.MODALITIES)
    assert bool(violations) == flagged, violations
    for name, entry in report.items():
      i = tok.MODALITIES.index(name)
      assert entry['excess'] == pytest.approx(
          stats['loss_sum'][i] / stats['count'][i] - entry['floor'], abs=1e-4)
      assert set(entry['by_order']) == {'text_first', 'image_first'}
  assert 'text: loss' in violations[0] and 'below the exact floor' in violations[0]


def test_excess_stderr_is_the_sequence_clustered_ratio_error():
  rng = np.random.default_rng(0)
  d = rng.normal(0.3, 1.0, (50, 20))  # 50 sequences x 20 tokens of excess
  n = np.full(50, 20.0)
  sums = {'loss_sum': np.array([d.sum() + 1.0]), 'floor_sum': np.array([1.0]),
          'count': np.array([n.sum()]), 'rows': np.array([50.0]),
          'd2': np.array([(d.sum(1) ** 2).sum()]), 'dn': np.array([(d.sum(1) * n).sum()]),
          'n2': np.array([(n ** 2).sum()])}
  e = evaluate.excess_entry(sums, 0)
  per_sequence = d.mean(1)  # equal lengths: the ratio is the mean of sequence means
  assert e['excess'] == pytest.approx(per_sequence.mean())
  assert e['excess_stderr'] == pytest.approx(per_sequence.std(ddof=1) / np.sqrt(50))


def test_floor_support_names_what_has_no_floor(data_dir):
  data_cfg = _shapes_data(data_dir)
  assert pipeline.floor_support(data_cfg) is None
  data_cfg.image_size = 16
  assert 'resizes' in pipeline.floor_support(data_cfg)
  data_cfg.image_size, data_cfg.tfds_name = 32, 'mnist'
  assert 'not an embedded dataset' in pipeline.floor_support(data_cfg)
  with pytest.raises(ValueError, match='no exact floor'):
    pipeline.make_eval_iterator(data_cfg, seq_len=8, batch_size=8, with_floor=True)


def _shapes_data(data_dir):
  from configs import dense
  c = dense.get_config('tiny').data
  c.data_dir = data_dir
  return c
