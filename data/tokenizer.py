"""One shared vocabulary for early-fusion text + image sequences (pure numpy).

Vocabulary (`vocab_size(codebook)`: 384 for 'rgb64', 512 for 'palette'; ids past the
last image code are padding so the embedding table is a multiple of 128):

  0..4      PAD, BOS, EOS, BOI (begin of image), EOI (end of image); 5..7 reserved
  8..263    text: byte b -> TEXT_OFFSET + b (utf-8, byte level, no merges)
  264..     image: code c -> IMAGE_OFFSET + c, c in [0, num_image_codes(codebook))

A dataset may instead carry its own image codes (`data.image_tokens_key`, e.g. from the
user's VQ tokenizer) in [0, data.image_vocab_size): they take the same place, code c ->
IMAGE_OFFSET + c (`encode_codes`), and `vocab_size(codebook, image_vocab_size)` grows to
hold them. Otherwise image tokens come from a FIXED patch codebook (`data.codebook`).
The image (uint8 HxWx3; grayscale HxW or HxWx1 is replicated to RGB) is resized with PIL
(bilinear) to image_size x image_size if it is not already, then cut into patch_size x
patch_size patches in raster order (grid = image_size // patch_size per side, grid**2
tokens). Each patch becomes one code:

  'rgb64'    the patch's mean RGB quantised to 2 bits per channel, level =
             floor(mean / 255 * 3 + 0.5) in {0..3} (round half up), code = r*16 + g*4 + b
             in [0, 64). Colour and coverage mix: a patch half covered by a bright colour
             reads as a darker colour.
  'palette'  shape and colour apart (mm_scenes): a pixel is ON if its largest channel is
             >= 64; the patch's four quadrants (q0 top left = bit 1, q1 top right = 2,
             q2 bottom left = 4, q3 bottom right = 8) are ON if at least half their pixels
             are; code = 0 if no quadrant is ON, else 16 * colour + mask, colour the index
             in PALETTE nearest (RGB distance) to the mean of the patch's ON pixels.
             192 codes; patch_size must be even.

`decode_image` inverts a codebook coarsely for visualisation. Sequences are assembled as

  [BOS] text [BOI] image [EOI] [EOS]     (text first)
  [BOS] [BOI] image [EOI] text [EOS]     (image first)

with either part possibly absent. Specials, BOI/EOI included, count as TEXT
modality; ids >= IMAGE_OFFSET (every codebook's codes and a dataset's own) are IMAGE.
"""

from typing import Optional

import numpy as np
from PIL import Image

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4  # specials (ids 5..7 reserved)
TEXT_OFFSET = 8  # byte b -> token 8 + b (ids 8..263)
IMAGE_OFFSET = 264  # image code c -> 264 + c
NUM_IMAGE_CODES = 64  # 'rgb64' (the default codebook): 4 levels per RGB channel
VOCAB_SIZE = 384  # 'rgb64': 328 used, padded to a multiple of 128
CODEBOOKS = ('rgb64', 'palette')
_NUM_CODES = {'rgb64': NUM_IMAGE_CODES, 'palette': 192}
MAX_IMAGE_CODES = max(_NUM_CODES.values())
_VOCAB = {'rgb64': VOCAB_SIZE, 'palette': 512}  # 456 used
# The 'palette' codebook's colours (mm_scenes draws with exactly these).
PALETTE = {
    'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255),
    'yellow': (255, 255, 0), 'magenta': (255, 0, 255), 'cyan': (0, 255, 255),
    'white': (255, 255, 255), 'orange': (255, 128, 0), 'purple': (128, 0, 255),
    'pink': (255, 128, 192), 'brown': (128, 64, 0), 'gray': (128, 128, 128),
}
_PALETTE_RGB = np.array(list(PALETTE.values()), np.float64)
ON_LEVEL = 64  # 'palette': a pixel is ON if its largest channel is at least this
MODALITIES = ('text', 'image')
TEXT, IMAGE = 0, 1

LEVELS = 4  # quantisation levels per channel (2 bits)
LEVEL_SCALE = 255 // (LEVELS - 1)  # level -> pixel value for decoding (85)


# ---------------------------------------------------------------------------
# Text.


def encode_text(s: str) -> np.ndarray:
  """utf-8 bytes of `s` as int32 token ids in [TEXT_OFFSET, TEXT_OFFSET+256)."""
  return encode_bytes(s.encode('utf-8'))


def encode_bytes(b: bytes) -> np.ndarray:
  """Raw bytes as int32 token ids (what `encode_text` does after utf-8)."""
  return np.frombuffer(b, dtype=np.uint8).astype(np.int32) + TEXT_OFFSET


def decode_text(tokens) -> str:
  """Inverse of `encode_text`; non-text ids (specials, image) are dropped."""
  t = np.asarray(tokens).reshape(-1)
  t = t[(t >= TEXT_OFFSET) & (t < TEXT_OFFSET + 256)]
  return (t - TEXT_OFFSET).astype(np.uint8).tobytes().decode('utf-8', 'replace')


# ---------------------------------------------------------------------------
# Images.


def _as_rgb(img) -> np.ndarray:
  img = np.asarray(img)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim == 2:
    img = np.stack([img] * 3, axis=-1)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f'expected an HxW, HxWx1 or HxWx3 image, got {img.shape}')
  if img.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {img.dtype}')
  return img


def check_codebook(codebook: str) -> None:
  if codebook not in CODEBOOKS:
    raise ValueError(f'data.codebook={codebook!r} is not one of {CODEBOOKS}')


def num_image_codes(codebook: str) -> int:
  check_codebook(codebook)
  return _NUM_CODES[codebook]


def vocab_size(codebook: str, image_vocab_size: int = 0) -> int:
  """The smallest model.vocab_size that holds every token of `codebook` and, if
  image_vocab_size > 0, a dataset's own image codes [0, image_vocab_size) (a multiple of
  128: 384 for 'rgb64', 512 for 'palette', 1408 for 1024 own codes)."""
  check_codebook(codebook)
  if image_vocab_size <= 0:
    return _VOCAB[codebook]
  used = IMAGE_OFFSET + max(_NUM_CODES[codebook], image_vocab_size)
  return -(-used // 128) * 128


def encode_codes(codes, image_vocab_size: int) -> np.ndarray:
  """A dataset's own image codes (any integer shape, raster order) -> int32 ids
  IMAGE_OFFSET + c; a code outside [0, image_vocab_size) raises ValueError."""
  c = np.asarray(codes).reshape(-1)
  if c.size and not np.issubdtype(c.dtype, np.integer):
    raise ValueError(f'image codes must be integers, got {c.dtype}')
  bad = c[(c < 0) | (c >= image_vocab_size)]
  if bad.size:
    raise ValueError(f'image code {int(bad[0])} is outside [0, '
                     f'data.image_vocab_size={image_vocab_size})')
  return c.astype(np.int32) + IMAGE_OFFSET


def quantise_rgb(mean_rgb) -> np.ndarray:
  """Mean RGB values in [0, 255] (..., 3) -> codes in [0, 64) (int32)."""
  mean_rgb = np.asarray(mean_rgb, dtype=np.float64)
  levels = np.floor(mean_rgb / 255.0 * (LEVELS - 1) + 0.5).astype(np.int32)
  levels = np.clip(levels, 0, LEVELS - 1)
  return levels[..., 0] * LEVELS**2 + levels[..., 1] * LEVELS + levels[..., 2]


def encode_image(img, image_size: int, patch_size: int,
                 codebook: str = 'rgb64') -> np.ndarray:
  """uint8 image -> int32 [(image_size // patch_size)**2] ids (with offset)."""
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} not divisible by {patch_size=}')
  img = _as_rgb(img)
  if img.shape[:2] != (image_size, image_size):
    pil = Image.fromarray(img).resize((image_size, image_size),
                                      Image.Resampling.BILINEAR)
    img = np.asarray(pil)
  return encode_images(img[None], patch_size, codebook)[0] + IMAGE_OFFSET


def encode_images(imgs, patch_size: int, codebook: str = 'rgb64') -> np.ndarray:
  """uint8 [N, S, S, 3] images of a size divisible by patch_size -> int32 CODES
  [N, (S // patch_size)**2] (no offset, no resizing): `encode_image` for many at once."""
  check_codebook(codebook)
  imgs = np.asarray(imgs)
  n, size = imgs.shape[0], imgs.shape[1]
  g, p = size // patch_size, patch_size
  patches = imgs.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)  # [N, g, g, p, p, 3]
  if codebook == 'rgb64':
    means = patches.astype(np.float64).mean(axis=(3, 4))
    return quantise_rgb(means).reshape(n, -1).astype(np.int32)
  if p % 2:
    raise ValueError(f"the 'palette' codebook needs an even patch_size, got {p}")
  on = patches.max(axis=-1) >= ON_LEVEL  # [N, g, g, p, p]
  h = p // 2
  quads = on.reshape(n, g, g, 2, h, 2, h).sum(axis=(4, 6))  # [N, g, g, 2, 2]
  bits = (2 * quads >= h * h).reshape(n, g, g, 4)
  mask = (bits * np.array([1, 2, 4, 8])).sum(-1)
  count = on.sum(axis=(3, 4))
  mean = (patches * on[..., None]).sum(axis=(3, 4)) / np.maximum(count, 1)[..., None]
  dist = ((mean[..., None, :] - _PALETTE_RGB) ** 2).sum(-1)  # [N, g, g, colours]
  colour = dist.argmin(-1)
  return np.where(mask > 0, 16 * colour + mask, 0).reshape(n, -1).astype(np.int32)


def decode_image(tokens, grid: int, patch_size: int = 1,
                 codebook: str = 'rgb64') -> np.ndarray:
  """Image ids -> coarse uint8 [grid * patch_size, grid * patch_size, 3].

  Non-image ids in `tokens` are ignored; the first grid**2 image ids are used,
  and missing ones (e.g. a truncated sample) are drawn black (code 0). 'palette'
  draws each ON quadrant in its colour (patch_size even; 1 draws the colour alone).
  """
  t = np.asarray(tokens).reshape(-1)
  codes = t[(t >= IMAGE_OFFSET) & (t < IMAGE_OFFSET + num_image_codes(codebook))]
  codes = codes[:grid * grid] - IMAGE_OFFSET
  codes = np.pad(codes, (0, grid * grid - len(codes)))
  if codebook == 'palette':
    rgb = _PALETTE_RGB[codes // 16].astype(np.uint8)
    bits = (codes[:, None] >> np.arange(4)) & 1  # [g*g, 4]
    if patch_size == 1:
      img = np.where(bits.any(-1, keepdims=True), rgb, 0).reshape(grid, grid, 3)
      return img.astype(np.uint8)
    h = patch_size // 2
    quad = bits.reshape(grid, grid, 2, 2)
    img = np.repeat(np.repeat(quad, h, axis=2), h, axis=3)  # [g, g, p, p]
    img = img[..., None] * rgb.reshape(grid, grid, 1, 1, 3)
    return img.transpose(0, 2, 1, 3, 4).reshape(grid * patch_size, grid * patch_size,
                                                3).astype(np.uint8)
  levels = np.stack(
      [codes // LEVELS**2, (codes // LEVELS) % LEVELS, codes % LEVELS], -1)
  img = (levels * LEVEL_SCALE).astype(np.uint8).reshape(grid, grid, 3)
  return np.repeat(np.repeat(img, patch_size, axis=0), patch_size, axis=1)


def modality_of(tokens) -> np.ndarray:
  """IMAGE (1) for image ids (>= IMAGE_OFFSET), TEXT (0) for everything else, same shape."""
  return np.where(np.asarray(tokens) >= IMAGE_OFFSET, IMAGE, TEXT).astype(np.int32)


# ---------------------------------------------------------------------------
# Sequences.


def build_sequence(text_tokens: Optional[np.ndarray],
                   image_tokens: Optional[np.ndarray],
                   image_first: bool) -> np.ndarray:
  """Assembles one int32 sequence; `None` or empty parts are left out."""
  parts = [[BOS]]
  text = [] if text_tokens is None else [np.asarray(text_tokens, np.int32)]
  image = []
  if image_tokens is not None and len(image_tokens):
    image = [[BOI], np.asarray(image_tokens, np.int32), [EOI]]
  parts += image + text if image_first else text + image
  parts.append([EOS])
  return np.concatenate([np.asarray(p, np.int32) for p in parts])


def to_example(seq, seq_len: int) -> dict[str, np.ndarray]:
  """Sequence -> next-token example; all arrays have shape [seq_len].

  The sequence is truncated or PAD-padded to seq_len + 1 tokens `s`;
  tokens = s[:-1], targets = s[1:], loss_mask = (targets != PAD).
  """
  seq = np.asarray(seq, np.int32)[:seq_len + 1]
  s = np.full(seq_len + 1, PAD, np.int32)
  s[:len(seq)] = seq
  tokens, targets = s[:-1].copy(), s[1:].copy()
  return {
      'tokens': tokens,
      'targets': targets,
      'modality': modality_of(tokens),
      'target_modality': modality_of(targets),
      'loss_mask': (targets != PAD).astype(np.float32),
  }


def pad_example(seq_len: int) -> dict[str, np.ndarray]:
  """An all-PAD example (loss_mask 0), used to fill the last eval batch."""
  return to_example(np.zeros(0, np.int32), seq_len)
