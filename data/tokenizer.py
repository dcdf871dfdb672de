"""One shared vocabulary for early-fusion text + image sequences (pure numpy).

Vocabulary (VOCAB_SIZE = 384; ids 0..327 are used, the rest is padding so the
embedding table is a multiple of 128):

  0..4      PAD, BOS, EOS, BOI (begin of image), EOI (end of image); 5..7 reserved
  8..263    text: byte b -> TEXT_OFFSET + b (utf-8, byte level, no merges)
  264..327  image: code c -> IMAGE_OFFSET + c, c in [0, NUM_IMAGE_CODES)

Image tokens come from a FIXED patch codebook, no learned VQ model:

  1. the image (uint8 HxWx3; grayscale HxW or HxWx1 is replicated to RGB) is
     resized with PIL (bilinear) to image_size x image_size if it is not already;
  2. it is cut into patch_size x patch_size patches in raster order
     (grid = image_size // patch_size patches per side, grid**2 tokens);
  3. each patch's mean RGB is quantised to 2 bits per channel,
     level = floor(mean / 255 * 3 + 0.5) in {0, 1, 2, 3} (round half up),
     and code = r * 16 + g * 4 + b in [0, 64).

`decode_image` inverts the quantisation coarsely (level -> level * 85) for
visualisation. Sequences are assembled as

  [BOS] text [BOI] image [EOI] [EOS]     (text first)
  [BOS] [BOI] image [EOI] text [EOS]     (image first)

with either part possibly absent. Specials, BOI/EOI included, count as TEXT
modality; only ids in [IMAGE_OFFSET, IMAGE_OFFSET + NUM_IMAGE_CODES) are IMAGE.
"""

from typing import Optional

import numpy as np
from PIL import Image

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4  # specials (ids 5..7 reserved)
TEXT_OFFSET = 8  # byte b -> token 8 + b (ids 8..263)
IMAGE_OFFSET = 264  # image code c -> 264 + c
NUM_IMAGE_CODES = 64  # 4 levels per RGB channel
VOCAB_SIZE = 384  # 328 used, padded to a multiple of 128
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


def quantise_rgb(mean_rgb) -> np.ndarray:
  """Mean RGB values in [0, 255] (..., 3) -> codes in [0, 64) (int32)."""
  mean_rgb = np.asarray(mean_rgb, dtype=np.float64)
  levels = np.floor(mean_rgb / 255.0 * (LEVELS - 1) + 0.5).astype(np.int32)
  levels = np.clip(levels, 0, LEVELS - 1)
  return levels[..., 0] * LEVELS**2 + levels[..., 1] * LEVELS + levels[..., 2]


def encode_image(img, image_size: int, patch_size: int) -> np.ndarray:
  """uint8 image -> int32 [(image_size // patch_size)**2] ids (with offset)."""
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} not divisible by {patch_size=}')
  img = _as_rgb(img)
  if img.shape[:2] != (image_size, image_size):
    pil = Image.fromarray(img).resize((image_size, image_size),
                                      Image.Resampling.BILINEAR)
    img = np.asarray(pil)
  g = image_size // patch_size
  patches = img.reshape(g, patch_size, g, patch_size, 3).astype(np.float64)
  means = patches.mean(axis=(1, 3))  # [g, g, 3], raster order below
  return quantise_rgb(means).reshape(-1).astype(np.int32) + IMAGE_OFFSET


def decode_image(tokens, grid: int, patch_size: int = 1) -> np.ndarray:
  """Image ids -> coarse uint8 [grid * patch_size, grid * patch_size, 3].

  Non-image ids in `tokens` are ignored; the first grid**2 image ids are used,
  and missing ones (e.g. a truncated sample) are drawn black (code 0).
  """
  t = np.asarray(tokens).reshape(-1)
  codes = t[(t >= IMAGE_OFFSET) & (t < IMAGE_OFFSET + NUM_IMAGE_CODES)]
  codes = codes[:grid * grid] - IMAGE_OFFSET
  codes = np.pad(codes, (0, grid * grid - len(codes)))
  levels = np.stack(
      [codes // LEVELS**2, (codes // LEVELS) % LEVELS, codes % LEVELS], -1)
  img = (levels * LEVEL_SCALE).astype(np.uint8).reshape(grid, grid, 3)
  return np.repeat(np.repeat(img, patch_size, axis=0), patch_size, axis=1)


def modality_of(tokens) -> np.ndarray:
  """IMAGE (1) for image ids, TEXT (0) for everything else, same shape."""
  t = np.asarray(tokens)
  is_image = (t >= IMAGE_OFFSET) & (t < IMAGE_OFFSET + NUM_IMAGE_CODES)
  return np.where(is_image, IMAGE, TEXT).astype(np.int32)


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
