"""MoMa: modality-aware experts (per-modality expert groups with expert-choice routing),
mixture-of-depths and auxiliary routers for causal inference (models/moma.py, models/mod.py,
docs/moma.md).

Run (2 CPU cores, a few minutes each):
  python train.py --config=configs/moma.py:tiny --workdir=runs/moma_tiny
  python train.py --config=configs/moma.py:tiny,stage=aux --workdir=runs/moma_tiny
  python eval.py --config=configs/moma.py:tiny --workdir=runs/moma_tiny
The second command trains the auxiliary routers of the trained model (main model frozen) in
runs/moma_tiny/aux/; eval.json then has a `causal_loss` next to each modality's `loss`.

Args: a size from configs/common.py SIZES, then variants:
  groups=4t4i     experts per modality: 1t1i (modality-untied FFN), 4t4i, 7t1i, ...
  mod=0|1         mixture-of-depths in alternating layers from layer 0
  router=expert_choice|topk   routing inside each group
  shared=0        MoIIE: a pool of N experts shared by all modalities (expert choice)
  norm=res_post|pre
  stage=main|aux  aux: train the auxiliary routers of the model in WORKDIR
  upcycle_from=DIR  start from DIR's latest checkpoint (a dense or 1t1i run): each
                  modality's FFN copied into its experts, fresh schedule, DIR's data position
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128 (mm_scenes)
  attn_gate=none  gated attention (docs/gates.md): none | headwise | elementwise
e.g. `configs/moma.py:tiny,groups=1t1i`, `configs/moma.py:tiny,groups=4t4i,mod=1`.
"""

import ml_collections

from configs import common

VARIANTS = {'groups': '4t4i', 'mod': '0', 'router': 'expert_choice', 'shared': '0',
            'norm': 'res_post', 'stage': 'main', 'upcycle_from': '', **common.MODEL_VARIANTS}

# The auxiliary-router stage (paper: lr 1e-4 -> 1e-6 linear, 1-2k warmup, 5-10k steps at
# 1.4B; tiny models take a larger rate and fewer steps).
AUX_STAGE = {'tiny': dict(total_steps=150, learning_rate=3e-3, warmup_steps=10),
             'small': dict(total_steps=2_000, learning_rate=3e-4, warmup_steps=200),
             'base': dict(total_steps=5_000, learning_rate=1e-4, warmup_steps=1_000),
             '1b': dict(total_steps=10_000, learning_rate=1e-4, warmup_steps=2_000)}


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS)
  c = common.base_config(size, v['data'], attn_gate=v['attn_gate'])
  c.model.family = 'moma'
  c.model.moma = moma_block(groups=v['groups'], mlp_dim=c.model.mlp_dim, router=v['router'],
                            shared=common.parse_int(v, 'shared'), norm=v['norm'],
                            gumbel=bool(v['upcycle_from']), mod=common.parse_bool(v, 'mod'))
  set_stage(c, size, v['stage'])
  c.upcycle_from = v['upcycle_from']  # '' or the workdir of a dense/1t1i run
  return c


def set_stage(c, size: str, stage: str) -> None:
  """config.stage (main | aux); the aux stage's schedule (AUX_STAGE) for the aux routers."""
  c.stage = stage
  if stage == 'aux':
    c.update(AUX_STAGE[size])
    c.end_lr_factor = 0.01
    c.log_every = min(c.log_every, 25)
    c.checkpoint_every = c.total_steps


def moma_block(*, groups: str, mlp_dim: int, router: str = 'expert_choice', shared: int = 0,
               norm: str = 'res_post', gumbel: bool = False, mod: bool | None = False):
  """The MoMa FFN's keys (`model.moma`; a Mamba hybrid's `model.mamba.moma`). mod=None: no
  mixture-of-depths block (the hybrid has none)."""
  block = ml_collections.ConfigDict(dict(
      groups=groups,  # experts per modality
      capacity='',  # c_e of every modality group; '' = 1 / (experts of the group)
      router=router,  # expert_choice (paper) | topk (token choice inside groups)
      k=1,  # topk only
      mlp_dim=mlp_dim,  # F of each expert (the dense FFN's width)
      group_sequences=1,  # sequences per routing group
      shared_experts=shared,  # MoIIE pool size (0 = none)
      shared_capacity='',  # c of the pool; '' = 1 / shared_experts
      gumbel=gumbel,  # Gumbel-sigmoid routing noise while training
      load_balance_coef=0.01,  # topk only
      norm=norm,
  ))
  if mod is not None:
    block.mod = ml_collections.ConfigDict(dict(
        enabled=mod,
        capacity=0.25,  # c_d
        every=2,  # MoD in layers 0, 2, 4, ...
        scale=True,  # scale the layer's update by the router weight
    ))
  return block
