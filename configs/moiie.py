"""MoIIE: per-modality routers over intra-modality experts plus a shared inter-modality pool,
token-choice top-k with renormalised weights, a MoE FFN every other layer (models/moiie.py,
moe/moiie.py, docs/moiie.md).

Run (2 CPU cores, a few minutes):
  python train.py --config=configs/moiie.py:tiny --workdir=runs/moiie_tiny
  python eval.py --config=configs/moiie.py:tiny --workdir=runs/moiie_tiny
eval.json's `routing.layers[i].load[modality][expert]` is the fraction of each modality's
tokens each expert processed (a modality's own experts and the shared ones; 0 on the other
modality's).

Args: a size from configs/common.py SIZES, then variants:
  groups=4t4i     intra-modality experts per modality (MoMa's syntax: 4t4i, 2t6i, ...)
  shared=2        experts of the shared pool, candidates of every modality's router
  k=2             experts per token, among its modality's candidates (groups + shared)
  every=2         a MoIIE FFN in layers every-1, 2*every-1, ...; the others dense SwiGLU
  upcycle_from=DIR  start from DIR's latest checkpoint (a dense run of the same shape):
                  every expert a copy of the dense FFN of its layer, fresh routers
  attn_gate=none  gated attention (docs/gates.md): none | headwise | elementwise
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128 (mm_scenes)
e.g. `configs/moiie.py:tiny,groups=2t6i,shared=4,k=2`.
Not MoMa's `configs/moma.py:tiny,shared=2`, whose shared group is routed separately (its
own expert choice) and always added: here the pool competes in each modality's softmax.
"""

import ml_collections

from configs import common

VARIANTS = {**common.MODEL_VARIANTS, 'groups': '4t4i', 'shared': '2', 'k': '2', 'every': '2', 'upcycle_from': ''}


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS)
  c = common.base_config(size, v['data'], attn_gate=v['attn_gate'])
  c.model.family = 'moiie'
  c.model.moiie = ml_collections.ConfigDict(dict(
      groups=v['groups'],  # intra-modality experts per modality
      shared=common.parse_int(v, 'shared'),  # inter-modality (shared) experts
      k=common.parse_int(v, 'k', minimum=1),  # experts per token
      every=common.parse_int(v, 'every', minimum=1),  # MoIIE iff layer % every == every - 1
      mlp_dim=c.model.mlp_dim,  # F of each expert (the dense FFN's width: upcyclable)
      jitter=0.01,  # multiplicative router-input noise x * U(1 - eps, 1 + eps), training
      load_balance_coef=0.01,  # alpha of each modality router's Switch loss (summed)
  ))
  c.upcycle_from = v['upcycle_from']  # '' or the workdir of a dense run
  return c
