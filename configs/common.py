"""What every model family's config shares: the ONE size table, the training, mesh and data
defaults, and the parser of `get_config` arguments ("tiny", "small,key=value,...").

Config files import only this module, ml_collections and the numpy tokenizer (no jax).
"""

from __future__ import annotations

import math

import ml_collections

from data import scenes, tokenizer

# The size table. Dense shapes follow the MoMa paper's 90M / 435M / 1.4B models (l/d/F/h)
# so replications compare like with like; `tiny` trains in minutes on 2 CPU cores.
# Per size: model shape + default batch, length, steps and peak learning rate. tiny/small
# (seq_len None) take the embedded dataset's longest sequence (DATASETS); base/1b are meant
# for longer user datasets (`--config.data.tfds_name=...`) on GPUs/TPUs.
SIZES = {
    'tiny':  dict(num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=4, mlp_dim=512,
                  batch_size=32, seq_len=None, total_steps=300, learning_rate=3e-3),
    'small': dict(num_layers=8, embed_dim=512, num_heads=8, num_kv_heads=8, mlp_dim=2048,
                  batch_size=256, seq_len=None, total_steps=20_000, learning_rate=1e-3),
    'base':  dict(num_layers=24, embed_dim=1024, num_heads=16, num_kv_heads=16, mlp_dim=4096,
                  batch_size=256, seq_len=2048, total_steps=100_000, learning_rate=3e-4),
    '1b':    dict(num_layers=24, embed_dim=2048, num_heads=16, num_kv_heads=16, mlp_dim=8192,
                  batch_size=512, seq_len=4096, total_steps=250_000, learning_rate=1e-4),
}

# The embedded datasets (`data=NAME` in every decoder family's config arg): their data block
# and the length of their longest sequence, which tiny/small take as seq_len (rounded up to a
# multiple of 16), so no sequence is cut. mm_shapes: 54 + 50 caption bytes, 64 image tokens,
# 4 specials (tests/test_data.py checks it); mm_scenes: data/scenes.max_sequence_length.
DATASETS = {
    'shapes': dict(tfds_name='mm_shapes', image_size=32, patch_size=4, codebook='rgb64',
                   label_key='label'),
    'scenes': dict(tfds_name='mm_scenes', patch_size=4, codebook='palette', label_key=''),
}
SHAPES_MAX_LEN = 172


def dataset(name: str) -> tuple[dict, int]:
  """'shapes' | 'scenes' | 'scenes/g3_k128' -> (data config values, longest sequence)."""
  base, _, variant = name.partition('/')
  if base not in DATASETS or (variant and base != 'scenes'):
    raise ValueError(f'data={name!r}: one of {sorted(DATASETS)}, or scenes/g<G>_k<K>')
  values = dict(DATASETS[base])
  if base == 'shapes':
    return values, SHAPES_MAX_LEN
  values['tfds_name'] = scenes.NAME + (f'/{variant}' if variant else '')
  spec = scenes.parse_name(values['tfds_name'])
  values['image_size'] = spec.image_size
  return values, scenes.max_sequence_length(spec)


# Sizes only big accelerators should run: their default mesh is FSDP over every device and
# their compute dtype bfloat16.
ACCELERATOR_SIZES = ('base', '1b')


def parse_arg(arg: str, *, allowed: dict[str, object] | None = None,
              list_keys: tuple[str, ...] = (), data: bool = True):
  """"small,mod=1,groups=4t4i" -> ("small", {"mod": "1", "groups": "4t4i", "data": "shapes"}).

  `allowed` maps each variant key a family accepts to its default; unknown keys raise.
  `data`: the family also takes `data=NAME`, the embedded dataset (DATASETS; default shapes).
  Values of `list_keys` may hold commas: "tiny,untie=ffn,attn" -> {"untie": "ffn,attn"}
  (a part without '=' continues the list value before it).
  """
  parts = [p.strip() for p in (arg or 'tiny').split(',') if p.strip()]
  size, variants = parts[0], {}
  if '=' in size:
    raise ValueError(f'config arg {arg!r} must start with a size, one of {sorted(SIZES)}')
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r} in config arg {arg!r}; sizes: {sorted(SIZES)}')
  allowed = dict(allowed or {})
  if data:
    allowed.setdefault('data', 'shapes')
  last = None
  for p in parts[1:]:
    key, eq, value = p.partition('=')
    if not eq and last in list_keys:
      variants[last] += ',' + p
      continue
    if not eq:
      raise ValueError(f'config arg part {p!r} is not key=value (in {arg!r})')
    last = key
    if key not in allowed:
      raise ValueError(f'unknown config arg key {key!r} in {arg!r}; '
                       f'known: {sorted(allowed) or "none"}')
    variants[key] = value
  return size, {**allowed, **variants}


BOOLS = {'1': True, 'true': True, '0': False, 'false': False}


def parse_bool(variants: dict, key: str) -> bool:
  """A boolean config-arg variant: 1/0/true/false (any case); anything else is refused."""
  value = str(variants[key])
  if value.lower() not in BOOLS:
    raise ValueError(f'config arg {key}={value!r} must be one of 1, 0, true, false')
  return BOOLS[value.lower()]


def parse_int(variants: dict, key: str, *, minimum: int = 0) -> int:
  """An integer config-arg variant >= `minimum`; anything else is refused."""
  value = str(variants[key])
  try:
    n = int(value)
  except ValueError:
    n = None
  if n is None or n < minimum:
    raise ValueError(f'config arg {key}={value!r} must be an integer >= {minimum}')
  return n


def parse_float(variants: dict, key: str) -> float:
  """A finite float config-arg variant; anything else is refused (ranges: the consumer's)."""
  value = str(variants[key])
  try:
    x = float(value)
  except ValueError:
    x = math.nan
  if not math.isfinite(x):
    raise ValueError(f'config arg {key}={value!r} must be a finite number')
  return x


def _vocab_size(codebook: str, image_vocab: ml_collections.FieldReference):
  """tokenizer.vocab_size(codebook, image_vocab) as a reference that follows image_vocab
  (an override of data.image_vocab_size), unless model.vocab_size is set itself:
  ceil((IMAGE_OFFSET + max(codebook's codes, image_vocab)) / 128) * 128."""
  codes = tokenizer.num_image_codes(codebook)
  most = (image_vocab + codes + abs(image_vocab - codes)) // 2  # max(image_vocab, codes)
  return -((-(most + tokenizer.IMAGE_OFFSET)) // 128) * 128


# Variants of the shared model keys a family's config arg may take (its VARIANTS include
# them; it passes them on to base_config): `attn_gate=headwise` sets model.attn_gate.
MODEL_VARIANTS = {'attn_gate': 'none'}


def base_config(size: str, data: str = 'shapes', *, attn_gate: str = 'none'
                ) -> ml_collections.ConfigDict:
  """Keys every family shares, filled in for `size` from the size table and for the embedded
  dataset `data` (DATASETS); `attn_gate`: model.attn_gate."""
  s = SIZES[size]
  big = size in ACCELERATOR_SIZES
  data_values, max_len = dataset(data)
  c = ml_collections.ConfigDict()
  c.size = size
  c.trainer = 'decoder'  # trainers.py: decoder | imp

  c.model = ml_collections.ConfigDict()
  c.model.family = 'dense'
  # bytes + specials + image codes, padded; follows --config.data.image_vocab_size
  image_vocab = ml_collections.FieldReference(0)
  c.model.vocab_size = _vocab_size(data_values['codebook'], image_vocab)
  c.model.num_layers = s['num_layers']
  c.model.embed_dim = s['embed_dim']
  c.model.num_heads = s['num_heads']
  c.model.num_kv_heads = s['num_kv_heads']
  c.model.head_dim = s['embed_dim'] // s['num_heads']
  c.model.mlp_dim = s['mlp_dim']
  c.model.rope_theta = 10_000.0
  c.model.attention_impl = ''  # '' (JAX picks) | 'xla' | 'cudnn'
  # gated attention (docs/gates.md): SDPA * sigmoid(x W_g) before W_O; 'none' | 'headwise'
  # (W_g [D, H]) | 'elementwise' (W_g [D, H, K])
  c.model.attn_gate = attn_gate
  # grouped-matmul kernel of dropless MoE and MoT (moe/grouped.py): 'auto' | 'ragged_dot' |
  # 'tokamax' | 'blocks' | 'batched'; all compute the same function
  c.model.grouped_impl = 'auto'
  c.model.remat = big

  c.total_steps = s['total_steps']
  c.batch_size = s['batch_size']  # global, in sequences
  c.seq_len = s['seq_len'] or -(-(max_len - 1) // 16) * 16  # targets: length - 1
  c.seed = 0
  c.learning_rate = s['learning_rate']  # peak
  # A reference: follows an overridden total_steps (--config.total_steps=10 -> 0) unless
  # warmup_steps is itself set.
  c.warmup_steps = c.get_ref('total_steps') // 20
  c.end_lr_factor = 0.1  # cosine decays to learning_rate * end_lr_factor
  c.weight_decay = 0.1
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.adam_eps = 1e-8
  c.grad_clip = 1.0
  c.param_dtype = 'float32'
  c.compute_dtype = 'bfloat16' if big else 'float32'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1 if big else -1  # -1 = all remaining devices
  c.mesh.fsdp = -1 if big else 1
  c.mesh.expert = 1
  c.mesh.tensor = 1

  c.log_every = 25 if size == 'tiny' else 100
  c.checkpoint_every = 100 if size == 'tiny' else 1000
  c.max_checkpoints = 3

  c.data = ml_collections.ConfigDict()
  c.data.tfds_name = 'mm_shapes'
  c.data.data_dir = ''  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.text_key = 'caption'
  c.data.image_key = 'image'
  c.data.label_key = 'label'
  c.data.image_size = 32
  c.data.patch_size = 4
  c.data.codebook = 'rgb64'  # image tokens (data/tokenizer.py): rgb64 | palette
  c.data.order = 'both'  # both | text_first | image_first
  # A dataset's own image codes (docs/own_data.md): an integer feature used instead of
  # patch-quantising data.image_key, and the size of the vocabulary it is drawn from.
  c.data.image_tokens_key = ''  # '' = off
  c.data.image_vocab_size = image_vocab  # 0 = the built-in codebook's
  c.data.update(data_values)
  c.data.num_workers = 0

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.num_examples = 1000  # from the eval split; 0 = all
  c.eval.generation = generation_config()
  return c


def generation_config() -> ml_collections.ConfigDict:
  """eval.generation: eval's generations (training/generation.py), scored on the embedded
  datasets; sample.py's defaults."""
  return ml_collections.ConfigDict(dict(
      num_examples=64,  # eval sequences whose prompt (caption or image) is continued; 0 = off
      temperature=0.0,  # 0 = greedy
      top_k=0,  # 0 = off
      top_p=1.0,  # 1 = off
      seed=0,
  ))
