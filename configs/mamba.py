"""Mamba and Mixture-of-Mamba (arXiv 2501.16295): a pure Mamba stack (pre-RMSNorm residual
blocks, no FFN), the projections untied by modality in Mixture-of-Mamba (models/mamba.py,
SPEC §5).

Run (2 CPU cores; the selective scan makes a Mamba tiny step about 3x a dense tiny step,
docs/mamba.md):
  python train.py --config=configs/mamba.py:tiny --workdir=runs/mamba_tiny
  python train.py --config=configs/mamba.py:tiny,untie=all --workdir=runs/mom_tiny
  python eval.py --workdir=runs/mom_tiny
A hybrid whose attention layers (every 2nd) have a MoE FFN, or MoMa's modality-grouped
expert-choice FFN (then its auxiliary routers, for generation and eval's causal pass):
  python train.py --config=configs/mamba.py:tiny,untie=all,attn_every=2,ffn=moe \
      --workdir=runs/mom_hybrid_moe
  python train.py --config=configs/mamba.py:tiny,untie=all,attn_every=2,ffn=moma \
      --workdir=runs/mom_hybrid_moma
  python train.py --config=configs/mamba.py:tiny,untie=all,attn_every=2,ffn=moma,stage=aux \
      --workdir=runs/mom_hybrid_moma

Args: a size from configs/common.py SIZES (twice its layers: a Mamba block has about half a
transformer layer's parameters at expand 2), then variants:
  untie=none      none (dense Mamba) | all (= in,x,dt,out: Mixture-of-Mamba) | any subset
                  of in, x, dt, out (the paper's ablation)
  state=16 conv=4 expand=2 chunk=64   N, K, E / D, the scan's chunk length
  scan=auto       inside a chunk: auto (sequential on CPU, associative elsewhere) |
                  associative | sequential
  attn_every=0    a hybrid: a transformer block (attention + SwiGLU) every n-th layer
  ffn=dense       the hybrid's attention layers' FFN: dense (SwiGLU) | moe (moe/layer.py,
                  `model.mamba.moe`: token-choice top-k, dropless) | moma (models/moma.py,
                  `model.mamba.moma`: configs/moma.py's keys, pre-norm); moe and moma need
                  attn_every > 0
  experts=4 k=1   ffn=moe: experts per layer and per token (each as wide as the dense FFN:
                  k = 1 is the dense FFN's active FLOPs)
  groups=4t4i     ffn=moma: experts per modality (expert choice, c = 1 / experts: one
                  expert's FLOPs per token on average)
  stage=main      main | aux (ffn=moma: train the auxiliary routers of a finished main run,
                  configs/moma.py AUX_STAGE)
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128
"""

import ml_collections

from configs import common, moma

VARIANTS = {**common.MODEL_VARIANTS, 'untie': 'none', 'state': '16', 'conv': '4',
            'expand': '2', 'chunk': '64', 'scan': 'auto', 'attn_every': '0', 'ffn': 'dense',
            'experts': '4', 'k': '1', 'groups': '4t4i', 'stage': 'main'}


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
      scan=v['scan'],  # inside a chunk: auto (sequential on CPU) | associative | sequential
      attn_every=common.parse_int(v, 'attn_every'),
      ffn=v['ffn'],  # dense | moe | moma: the FFN of the hybrid's attention layers
      moe=ml_collections.ConfigDict(dict(  # ffn=moe (the keys of configs/moe.py's block)
          num_experts=common.parse_int(v, 'experts', minimum=1),
          k=common.parse_int(v, 'k', minimum=1), router='topk_softmax', renormalize=False,
          dispatch='dropless', capacity_factor=1.25,
          mlp_dim=c.model.mlp_dim,  # each expert as wide as the dense FFN
          group_size=0, load_balance_coef=0.01, z_loss_coef=1e-3, jitter=0.0,
          num_shared_experts=0, residual=False)),
      moma=moma.moma_block(groups=v['groups'], mlp_dim=c.model.mlp_dim, norm='pre', mod=None),
  ))
  moma.set_stage(c, size, v['stage'])
  return c


# A saved config with this key is a Mamba run; the keys added to the family since its first
# runs, with the values that reproduce a run from before them (training/checkpoint.py
# LEGACY_DEFAULTS; a callable takes the saved flat config).
PRESENCE_KEY = 'model.mamba.state'
_ADDED = ('model.mamba.scan', 'model.mamba.ffn', 'model.mamba.moe.', 'model.mamba.moma.',
          'stage')


def _legacy_defaults() -> dict:
  flat = {}

  def walk(d, prefix):
    for k, v in d.items():
      if isinstance(v, ml_collections.ConfigDict):
        walk(v, f'{prefix}{k}.')
      else:
        flat[prefix + k] = v
  walk(get_config('tiny'), '')
  return {key: ((lambda saved: saved['model.mlp_dim'])  # experts as wide as the dense FFN
                if key.endswith('.mlp_dim') else value)
          for key, value in flat.items()
          if any(key == a or (a.endswith('.') and key.startswith(a)) for a in _ADDED)}


LEGACY_DEFAULTS = _legacy_defaults()
