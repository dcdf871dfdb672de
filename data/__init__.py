"""Data: one shared text+image vocabulary, the mm_shapes dataset, Grain pipelines.

  tokenizer  byte-level text + fixed 64-code patch codebook for images, sequence
             assembly and next-token examples (pure numpy).
  shapes     `mm_shapes`, a TFDS builder of captioned coloured shapes.
  pipeline   make_train_iterator / make_eval_iterator over any TFDS dataset
             prepared as array_record.
"""

from data.pipeline import make_eval_iterator
from data.pipeline import make_train_iterator
from data.shapes import MmShapes
from data.shapes import prepare
from data.tokenizer import BOI
from data.tokenizer import BOS
from data.tokenizer import build_sequence
from data.tokenizer import decode_image
from data.tokenizer import decode_text
from data.tokenizer import encode_image
from data.tokenizer import encode_text
from data.tokenizer import EOI
from data.tokenizer import EOS
from data.tokenizer import IMAGE
from data.tokenizer import IMAGE_OFFSET
from data.tokenizer import MODALITIES
from data.tokenizer import modality_of
from data.tokenizer import NUM_IMAGE_CODES
from data.tokenizer import PAD
from data.tokenizer import TEXT
from data.tokenizer import TEXT_OFFSET
from data.tokenizer import to_example
from data.tokenizer import VOCAB_SIZE
