"""Each model family learns the embedded datasets: a short run on shrunk tiny configs gets
both modalities' eval loss below their unigram loss (what ignoring context achieves), and
stays above the exact floor (data/floor.py) by more than its standard error."""

import pytest

from configs import dense, moe, moma, mot
from tests.helpers import tiny_config
from training import evaluate, loop

FAMILIES = {'dense': dense.get_config, 'moe': moe.get_config, 'moma': moma.get_config,
            'mot': mot.get_config}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_short_run_beats_unigram_on_both_modalities(family, data_dir, tmp_path):
  config = tiny_config(base=FAMILIES[family]('tiny'), **{
      'data.data_dir': data_dir, 'seq_len': 128, 'batch_size': 16, 'total_steps': 80,
      'warmup_steps': 8, 'learning_rate': 3e-3, 'checkpoint_every': 80, 'log_every': 40})
  if family == 'moe':
    config.model.moe.mlp_dim = 128
  if family == 'moma':  # 4t4i, expert choice c = 1/4: one expert of width 128 per token
    config.model.moma.mlp_dim = 128
  loop.train(config, str(tmp_path))
  report = evaluate.evaluate(config, str(tmp_path))
  for name, mod in report['modalities'].items():
    assert mod['loss'] < 0.8 * mod['unigram_loss'], (name, mod)
    assert mod['excess'] > 3 * mod['excess_stderr'] > 0, (name, mod)
  if family == 'moe':
    layers = report['routing']['layers']
    assert [l['layer'] for l in layers] == [1]  # every=2 with 2 layers: layer 1 is MoE
    assert len(layers[0]['expert_load']) == 8
    assert abs(sum(layers[0]['expert_load']) - 1) < 1e-5


def test_dense_learns_scenes_above_its_floor(tmp_path):
  config = tiny_config(base=dense.get_config('tiny,data=scenes'), **{
      'seq_len': 224, 'batch_size': 16, 'total_steps': 80, 'warmup_steps': 8,
      'checkpoint_every': 80, 'log_every': 40})
  loop.train(config, str(tmp_path))
  report = evaluate.evaluate(config, str(tmp_path))
  for name, mod in report['modalities'].items():
    assert mod['loss'] < mod['unigram_loss'], (name, mod)  # images take longer here
    assert mod['excess'] > 3 * mod['excess_stderr'] > 0, (name, mod)
    for order in ('text_first', 'image_first'):
      assert mod['by_order'][order]['excess'] > 0, (name, order, mod)
