"""Mamba and Mixture-of-Mamba (arXiv 2501.16295): a pure Mamba stack (pre-RMSNorm residual
blocks, no FFN), the projections untied by modality in Mixture-of-Mamba (models/mamba.py,
SPEC §5).

Run (2 CPU cores, a few minutes):
  python train.py --config=configs/mamba.py:tiny --workdir=runs/mamba_tiny
  python train.py --config=configs/mamba.py:tiny,untie=all --workdir=runs/mom_tiny
  python eval.py --workdir=runs/mom_tiny

Args: a size from configs/common.py SIZES (twice its layers: a Mamba block has about half a
transformer layer's parameters at expand 2), then variants:
  untie=none      none (dense Mamba) | all (= in,x,dt,out: Mixture-of-Mamba) | any subset
                  of in, x, dt, out (the paper's ablation)
  state=16 conv=4 expand=2 chunk=64   N, K, E / D, the scan's chunk length
  attn_every=0    a hybrid: a transformer block (attention + SwiGLU) every n-th layer
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128
"""

import ml_collections

from configs import common

VARIANTS = {**common.MODEL_VARIANTS, 'untie': 'none', 'state': '16', 'conv': '4', 'expand': '2', 'chunk': '64',
            'attn_every': '0'}


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS, list_keys=('untie',))
  c = common.base_config(size, v['data'], attn_gate=v['attn_gate'])
  c.model.family = 'mamba'
  c.model.num_layers = 2 * common.SIZES[size]['num_layers']
  c.model.mamba = ml_collections.ConfigDict(dict(
      untie=v['untie'],  # none | all | comma-separated subset of in, x, dt, out
      state=common.parse_int(v, 'state', minimum=1),  # N
      conv=common.parse_int(v, 'conv', minimum=1),  # K
      expand=common.parse_int(v, 'expand', minimum=1),  # E = expand * D
      dt_rank=0,  # R; 0 = ceil(D / 16)
      chunk=common.parse_int(v, 'chunk', minimum=1),
      attn_every=common.parse_int(v, 'attn_every'),
  ))
  return c
