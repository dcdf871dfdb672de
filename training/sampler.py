"""sample.py: prompts from the command line (captions, image files, eval examples) continued
by the newest checkpoint of a run -> WORKDIR/samples/sample.png and sample.json."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from PIL import Image

from data import pipeline, tokenizer
from models import families, sampling as sampling_lib
from training import evaluate, generation, state as state_lib, storage
from training.validate import validate


def image_ids(path: str, data_cfg) -> np.ndarray:
  """A PNG (or any PIL format) of data.image_size px -> its image token ids."""
  if pipeline.image_tokens_key(data_cfg):
    raise ValueError(f'--image: this run reads its dataset\'s own image codes '
                     f'(data.image_tokens_key={data_cfg.image_tokens_key!r}); caption its '
                     'images with --from_eval=N')
  try:
    img = np.asarray(Image.open(path).convert('RGB'))
  except (OSError, ValueError) as e:
    raise ValueError(f'--image={path}: cannot read it as an image ({e})') from None
  size = data_cfg.image_size
  if img.shape[:2] != (size, size):
    raise ValueError(f'--image={path} is {img.shape[1]}x{img.shape[0]} px; the model reads '
                     f'{size}x{size} images (data.image_size)')
  return tokenizer.encode_image(img, size, data_cfg.patch_size, pipeline.codebook(data_cfg))


def sample(config, workdir: str, *, captions=(), images=(), eval_indices=(), num: int = 4,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           out: str = '') -> dict:
  """Every prompt continued `num` times; writes the grid and the JSON; returns a summary."""
  if config.get('trainer', 'decoder') != 'decoder':
    raise ValueError(f'sample.py generates from decoder runs; {workdir} is a '
                     f'{config.trainer!r} run')
  validate(config, jax.device_count())
  try:
    sampling = sampling_lib.Sampling(temperature, top_k, top_p)
    sampling.check()
  except ValueError as e:
    raise ValueError(str(e).replace('sampling.', '--')) from None
  reason = families.get(config.model.family).decode_unsupported(state_lib.model_spec(config))
  if reason:
    raise ValueError(reason)
  prompts = [generation.text_prompt(c) for c in captions]
  prompts += [generation.image_prompt(image_ids(p, config.data)) for p in images]
  prompts += [generation.prompt_of_sequence(pipeline.eval_sequence(
      config.data, config.seq_len, i, image_first=True)) for i in eval_indices]
  generation.check_prompts(config, prompts)  # before restoring and compiling
  mesh, layout, state, step = evaluate.restore_latest(config, workdir)
  params, params_step, note = generation.decoding_params(workdir, state['params'], step, mesh)
  if params is None:
    raise ValueError(note)
  rows = [p for p in prompts for _ in range(num)]
  tokens = generation.run_generation(config, mesh, layout.graphdef, params, rows,
                                     sampling=sampling, seed=seed)
  samples = [generation.split_sample(p, r) for p, r in zip(rows, tokens)]
  if pipeline.floor_support(config.data) is None:
    for s in samples:  # a free-text caption the dataset never writes has no score
      try:
        generation.score([s], config.data)
      except ValueError:
        s.consistent = None
  out = out or storage.join(workdir, 'samples')
  storage.makedirs(out)
  png, js = storage.join(out, 'sample.png'), storage.join(out, 'sample.json')
  generation.draw(png, samples, config.data, f'{workdir} step {params_step}')
  extra = {'step': int(params_step), 'sampling': dataclasses.asdict(sampling), 'seed': seed}
  generation.write_samples(js, samples, extra)
  return {'png': png, 'json': js, **extra,
          'samples': [{'direction': s.direction, 'caption': s.caption,
                       'consistent': s.consistent} for s in samples]}
