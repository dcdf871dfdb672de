"""Decoder with mixture-of-experts FFNs (moe/): routers, capacity or dropless dispatch,
expert parallelism over the mesh axis `expert`.

Run (2 CPU cores, a few minutes):
  python train.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
  python eval.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
Expert parallelism on 8 devices (same losses as 1 device; see tests/test_moe_layer.py):
  python train.py --config=configs/moe.py:tiny --workdir=runs/moe_ep \
      --config.mesh.data=2 --config.mesh.expert=4

Args: a size from configs/common.py SIZES, then variants:
  experts=8   k=2   router=topk_softmax|topk_sigmoid|batch_prioritized|expert_choice|
  expert_choice_sigmoid   dispatch=dropless|capacity (default: dropless for token choice)
  every=2 (a MoE FFN every N layers)
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128 (mm_scenes)
e.g. `configs/moe.py:tiny,router=expert_choice,dispatch=capacity`.
"""

import ml_collections

from configs import common

VARIANTS = {'experts': '8', 'k': '2', 'router': 'topk_softmax',
            'dispatch': '',  # '' = dropless for token choice, capacity for expert choice
            'every': '2'}


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS)
  c = common.base_config(size, v['data'])
  c.model.family = 'moe'
  expert_choice = v['router'].startswith('expert_choice')
  c.model.moe = ml_collections.ConfigDict(dict(
      num_experts=common.parse_int(v, 'experts', minimum=1),  # E
      k=common.parse_int(v, 'k', minimum=1),  # experts per token (token-choice routers)
      router=v['router'],  # a key of moe/routing.py ROUTERS
      renormalize=False,  # token choice: top-k weights rescaled to sum to 1
      dispatch=v['dispatch'] or ('capacity' if expert_choice else 'dropless'),
      capacity_factor=1.0 if expert_choice else 1.25,  # c (capacity dispatch only)
      mlp_dim=c.model.mlp_dim,  # F of each expert (the dense FFN's width)
      every=common.parse_int(v, 'every', minimum=1),  # layer i is MoE iff i % every == every - 1
      group_size=0,  # tokens per routing group; 0 = one sequence
      load_balance_coef=0.0 if expert_choice else 0.01,  # Switch loss (alpha)
      z_loss_coef=1e-3,  # router z-loss (beta)
      jitter=0.0,  # multiplicative router-input noise during training
      num_shared_experts=0,  # always-on experts added to the routed output
      residual=False,  # PR-MoE: learned 2-way mix of the MoE and a dense MLP
  ))
  return c
