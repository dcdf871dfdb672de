"""Dense early-fusion decoder: the baseline every other family is compared with.

Run (2 CPU cores, ~4 minutes; `make train` runs this):
  python train.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny
  python eval.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny
Expect eval.json with text and image loss well below their unigram losses (see README).

Args: a size from configs/common.py SIZES: tiny | small | base | 1b. Larger sizes are for
GPUs/TPUs: they default to FSDP over all devices, bfloat16 compute and rematerialisation.
Then optionally:
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128 (mm_scenes)
  attn_gate=none  gated attention (docs/gates.md): none | headwise | elementwise
e.g. `configs/dense.py:tiny,data=scenes`, `configs/dense.py:tiny,attn_gate=headwise`.
"""

from configs import common

VARIANTS = {**common.MODEL_VARIANTS}


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS)
  c = common.base_config(size, v['data'], attn_gate=v['attn_gate'])
  c.model.family = 'dense'
  return c
