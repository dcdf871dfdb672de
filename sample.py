"""Generate from the newest checkpoint in --workdir: images from a caption, captions from an
image. Writes a PNG grid (images drawn from their tokens through the codebook, captions
above them) and a JSON of the prompts' and generations' tokens and texts.

  python sample.py --workdir=runs/moma_tiny --prompt="a large red circle at the top left" --num=16
  python sample.py --workdir=runs/moma_tiny --image=shape.png --num=4
  python sample.py --workdir=runs/moma_tiny --from_eval=3        # eval example 3's image

Decoding is cached and causal (models/generate.py); a MoMa model decodes with its aux
stage's routers (WORKDIR/aux: train.py --config=...,stage=aux). It runs on the run's mesh
(a --config may change it, as for eval.py). On the embedded datasets each generation is
scored: `consistent` in the JSON says whether the dataset's generator could have produced
it for that prompt (data/scoring.py). Output: --out (default WORKDIR/samples/)
sample.png and sample.json.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from training import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Optional: the config the run was trained with, to change the mesh. '
    'Default: the config saved in the checkpoint.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A caption to draw (text -> image); '
                                    'repeat the flag for several.')
_IMAGE = flags.DEFINE_multi_string('image', [], 'A PNG of data.image_size px to caption '
                                   '(image -> caption); repeat for several.')
_FROM_EVAL = flags.DEFINE_multi_integer('from_eval', [], 'Caption the image of this eval '
                                        'split example (its index); repeat for several.')
_NUM = flags.DEFINE_integer('num', 4, 'Generations per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0 = off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, '1 = off.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed, the same samples.')
_OUT = flags.DEFINE_string('out', '', 'Output directory (default WORKDIR/samples).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from training import metrics
  metrics.quiet_library_logs()

  def sample():
    from training import run, sampler
    if not (_PROMPT.value or _IMAGE.value or _FROM_EVAL.value):
      raise ValueError('nothing to generate: give --prompt="a caption", --image=PATH.png '
                       'or --from_eval=N')
    if _NUM.value < 1:
      raise ValueError(f'--num={_NUM.value} must be >= 1')
    config = run.config_of_run(_WORKDIR.value, _CONFIG.value)
    return sampler.sample(config, _WORKDIR.value, captions=_PROMPT.value, images=_IMAGE.value,
                          eval_indices=_FROM_EVAL.value, num=_NUM.value,
                          temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                          top_p=_TOP_P.value, seed=_SEED.value, out=_OUT.value)

  print(json.dumps(cli.run('sample.py', sample, workdir=_WORKDIR.value), indent=1))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('sample.py'))
