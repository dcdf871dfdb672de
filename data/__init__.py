"""Data: one shared text+image vocabulary, the mm_shapes dataset, Grain pipelines.

  tokenizer  byte-level text + fixed 64-code patch codebook for images, sequence
             assembly and next-token examples (pure numpy).
  shapes     `mm_shapes`, a TFDS builder of captioned coloured shapes.
  pipeline   make_train_iterator / make_eval_iterator over any TFDS dataset
             prepared as array_record.
"""

# Submodules are imported by name (`from data import tokenizer`): tokenizer is pure numpy,
# so configs can use it without pulling in TFDS and Grain.
