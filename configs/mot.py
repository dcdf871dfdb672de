"""Mixture-of-Transformers: every non-embedding weight untied by modality (Q, K, V, O, FFN,
norms), one global causal attention over the mixed sequence (models/mot.py, docs/mot.md).

Run (2 CPU cores, a few minutes):
  python train.py --config=configs/mot.py:tiny --workdir=runs/mot_tiny
  python eval.py --config=configs/mot.py:tiny --workdir=runs/mot_tiny
Expected: both modalities' eval loss far below their unigram loss (README results table).

Args: a size from configs/common.py SIZES, then variants:
  untie=all       which parts are untied: ffn | ffn,attn | all (= ffn,attn,norm) | none;
                  the paper's ablation is `untie=ffn`, `untie=ffn,attn`, `untie=all`
  qk_norm=0|1     RMSNorm of queries and keys over the head dim (per modality when untied)
  norm=res_post|pre
  moe=             a modality whose FFN is a MoE from moe/ (e.g. `moe=text`: the paper's
                  MoT + text MoE-4x: 4 experts, top-1 token choice, dropless)
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128 (mm_scenes)
  attn_gate=none  gated attention (W_g untied with W_Q): none | headwise | elementwise
e.g. `configs/mot.py:tiny,untie=ffn,attn`, `configs/mot.py:tiny,moe=text`.
"""

import ml_collections

from configs import common

VARIANTS = {'untie': 'all', 'qk_norm': '0', 'norm': 'res_post', 'moe': '',
            **common.MODEL_VARIANTS}


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS, list_keys=('untie',))
  c = common.base_config(size, v['data'], attn_gate=v['attn_gate'])
  c.model.family = 'mot'
  untie = {'all': 'ffn,attn,norm', 'none': ''}.get(v['untie'], v['untie'])
  c.model.mot = ml_collections.ConfigDict(dict(
      untie=untie,  # comma-separated subset of ffn, attn, norm
      qk_norm=common.parse_bool(v, 'qk_norm'),
      norm=v['norm'],  # res_post (the paper's form) | pre
      moe_modality=v['moe'],  # '' or a modality name: its FFN is `moe`
      moe=ml_collections.ConfigDict(dict(
          num_experts=4, k=1, router='topk_softmax', renormalize=False,
          dispatch='dropless', capacity_factor=1.25,
          mlp_dim=c.model.mlp_dim,  # each expert as wide as the dense FFN (MoE-4x)
          every=1, group_size=0, load_balance_coef=0.01, z_loss_coef=1e-3, jitter=0.0,
          num_shared_experts=0, residual=False)),
  ))
  return c
