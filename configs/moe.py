"""Decoder with mixture-of-experts FFNs (moe/): routers, capacity or dropless dispatch,
expert parallelism over the mesh axis `expert`; PR-MoE's pyramid and residual form, and
fine-grained upcycling from a dense run (docs/pyramid_upcycle.md).

Run (2 CPU cores, a few minutes):
  python train.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
  python eval.py --config=configs/moe.py:tiny --workdir=runs/moe_tiny
Expert parallelism on 8 devices (same losses as 1 device; see tests/test_moe_layer.py):
  python train.py --config=configs/moe.py:tiny --workdir=runs/moe_ep \
      --config.mesh.data=2 --config.mesh.expert=4
A PR-MoE pyramid (4 experts in the first MoE layer, 8 in the last) with the residual MLP:
  python train.py --config=configs/moe.py:tiny,experts=4,8,residual=1 --workdir=runs/prmoe
Fine-grained upcycling of a trained dense run (its FFN cut into 4 slices, each cloned into
2 experts; top-4 routing; the first step computes exactly the dense model):
  python train.py --config=configs/dense.py:tiny --workdir=runs/dense_tiny
  python train.py --config=configs/moe.py:tiny,slices=4,upcycle_from=runs/dense_tiny \
      --workdir=runs/moe_fine

Args: a size from configs/common.py SIZES, then variants:
  experts=8       E of every MoE layer; or one count per MoE layer (PR-MoE pyramid): an
                  explicit list `experts=4,8` or runs `experts=32x10,64x2` (32 experts in
                  the first 10 MoE layers, then 64 in the last 2)
  k=2   router=topk_softmax|topk_sigmoid|batch_prioritized|expert_choice|
  expert_choice_sigmoid|evomoe|activation_gate   dispatch=dropless|capacity (default:
                  dropless for token choice)
  The dense-to-sparse gates (docs/gates.md; moe/routing.py), router=evomoe|activation_gate:
  temperature=fixed|exponential|linear|learned  tau=1.0  tau_min=0.5  tau_steps=N
  threshold=X  hard_step=N (evomoe)  activation=identity|sigmoid|tanh|gelu (activation_gate)
                  evomoe defaults: k = all experts, exponential 1.0 -> 0.5 over the first
                  half of training, threshold 0.001, hard phase (top-1) in the second half;
                  activation_gate defaults: sigmoid, learned tau from 1.0, top-2
  spawn=copy|noise  evomoe's expert spawning from a dense run (with upcycle_from=DIR,
                  slices=1): each expert a copy of the FFN, or a copy plus Gaussian noise of
                  spawn_noise=0.01 times each weight matrix's std
  every=2         a MoE FFN every N layers
  residual=0|1    PR-MoE residual form: a dense MLP beside the MoE, mixed by a learned softmax
  slices=0        fine-grained experts: g slices of the dense FFN width (model.mlp_dim / g
                  each), experts E/g clones of each; default k = g, weights renormalised
  upcycle_from=DIR  start from DIR's latest checkpoint (a dense run; needs slices >= 1):
                  its FFNs cut into the experts, zero routers, fresh schedule, its data position
  data=shapes     the embedded dataset: shapes (mm_shapes) | scenes | scenes/g3_k128 (mm_scenes)
e.g. `configs/moe.py:tiny,router=expert_choice,dispatch=capacity`.
"""

import ml_collections

from configs import common

VARIANTS = {**common.MODEL_VARIANTS, 'experts': '8', 'k': '',  # '' = 2, or g under slices=g
            'router': 'topk_softmax',
            'dispatch': '',  # '' = dropless for token choice, capacity for expert choice
            'every': '2', 'residual': '0', 'slices': '0', 'upcycle_from': '',
            # dense-to-sparse gates ('' = the router's default, `gate_defaults`)
            'temperature': '', 'tau': '', 'tau_min': '', 'tau_steps': '', 'threshold': '',
            'hard_step': '', 'activation': '', 'spawn': 'copy', 'spawn_noise': '0.01'}
GATE_KEYS = ('temperature', 'tau', 'tau_min', 'tau_steps', 'threshold', 'hard_step',
             'activation')


def gate_defaults(router: str, total_steps) -> dict:
  """The dense-to-sparse gate keys of model.moe for `router` (RouterConfig's neutral values
  for the other routers); `total_steps` a FieldReference, so schedules follow an override."""
  if router == 'evomoe':  # SPEC §6: tau 1.0 -> 0.5, threshold 0.001, then top-1
    half = total_steps // 2
    return dict(temperature='exponential', tau=1.0, tau_min=0.5, tau_steps=half,
                threshold=0.001, hard_step=half, activation='identity')
  if router == 'activation_gate':
    return dict(temperature='learned', tau=1.0, tau_min=0.5, tau_steps=0, threshold=0.0,
                hard_step=-1, activation='sigmoid')
  return dict(temperature='fixed', tau=1.0, tau_min=0.5, tau_steps=0, threshold=0.0,
              hard_step=-1, activation='identity')


# A saved config with this key has a model.moe block; the keys added to it since, with the
# values that reproduce a run from before them (training/checkpoint.py LEGACY_DEFAULTS).
PRESENCE_KEY = 'model.moe.num_experts'
LEGACY_DEFAULTS = {f'model.moe.{k}': v for k, v in {
    **gate_defaults('topk_softmax', 0), 'spawn': 'copy', 'spawn_noise': 0.01}.items()}


def _gate_keys(v: dict, total_steps) -> dict:
  keys = gate_defaults(v['router'], total_steps)
  for key in GATE_KEYS:
    if v[key] == '':
      continue
    if key in ('temperature', 'activation'):
      keys[key] = v[key]
    elif key in ('tau_steps', 'hard_step'):
      keys[key] = -1 if v[key] == '-1' else common.parse_int(v, key)
    else:
      keys[key] = common.parse_float(v, key)
  return keys
PER_LAYER_KEY = 'config.model.moe.num_experts_per_layer'


def parse_expert_counts(text: str, key: str = PER_LAYER_KEY) -> tuple[int, ...]:
  """'32x10,64x2' -> (32,) * 10 + (64,) * 2; '4,8' -> (4, 8): one E per MoE layer, in layer
  order. Items are N (one layer) or NxC (N experts in C consecutive MoE layers), N and C
  positive integers. ValueError naming `key` otherwise."""
  counts = []
  for item in str(text).split(','):
    n, x, c = item.strip().partition('x')
    try:
      n, c = int(n), (int(c) if x else 1)
    except ValueError:
      n = c = 0
    if n <= 0 or c <= 0:
      raise ValueError(f'{key}={text!r}: each item must be N or NxC with positive integers '
                       f'(e.g. 4,8 or 32x10,64x2), got {item.strip()!r}')
    counts += [n] * c
  return tuple(counts)


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS, list_keys=('experts',))
  c = common.base_config(size, v['data'], attn_gate=v['attn_gate'])
  c.model.family = 'moe'
  expert_choice = v['router'].startswith('expert_choice')
  slices = common.parse_int(v, 'slices')
  if slices and c.model.mlp_dim % slices:
    raise ValueError(f'config arg slices={slices} does not divide the dense FFN width '
                     f'model.mlp_dim={c.model.mlp_dim}')
  experts, per_layer = v['experts'], ''
  if not experts.strip().isdigit():  # a pyramid: one count per MoE layer
    per_layer = experts
    experts = str(parse_expert_counts(experts, key='config arg experts')[0])
  if not v['k']:
    v['k'] = experts if v['router'] == 'evomoe' else str(slices or 2)
  c.model.moe = ml_collections.ConfigDict(dict(
      num_experts=common.parse_int({'experts': experts}, 'experts', minimum=1),  # E
      # PR-MoE pyramid: one E per MoE layer ('4,8' or '32x10,64x2'); '' = num_experts in all
      num_experts_per_layer=per_layer,
      k=common.parse_int(v, 'k', minimum=1),  # experts per token (token-choice routers)
      router=v['router'],  # a key of moe/routing.py ROUTERS
      # token choice: top-k weights rescaled to sum to 1 (fine-grained experts need it)
      renormalize=bool(slices) and v['router'] not in ('evomoe', 'activation_gate'),
      dispatch=v['dispatch'] or ('capacity' if expert_choice else 'dropless'),
      capacity_factor=1.0 if expert_choice else 1.25,  # c (capacity dispatch only)
      # F of each expert: the dense FFN's width, or model.mlp_dim / slices
      mlp_dim=c.model.mlp_dim // (slices or 1),
      every=common.parse_int(v, 'every', minimum=1),  # layer i is MoE iff i % every == every - 1
      group_size=0,  # tokens per routing group; 0 = one sequence
      load_balance_coef=0.0 if expert_choice else 0.01,  # Switch loss (alpha)
      z_loss_coef=1e-3,  # router z-loss (beta)
      jitter=0.0,  # multiplicative router-input noise during training
      num_shared_experts=0,  # always-on experts added to the routed output
      residual=common.parse_bool(v, 'residual'),  # PR-MoE: learned 2-way mix of MoE and MLP
      # fine-grained experts: g > 0 = expert e is a clone of slice e % g of a dense FFN of
      # width model.mlp_dim (mlp_dim = model.mlp_dim / g); the routed output is scaled by g
      # and clone co-firing is logged (layer_i/clone_cofire); 0 = plain experts
      slices=slices,
      # the dense-to-sparse gates (router evomoe | activation_gate; moe/routing.py)
      **_gate_keys(v, c.get_ref('total_steps')),
      spawn=v['spawn'],  # upcycle_from with evomoe: copy | noise (models/upcycle.py)
      spawn_noise=common.parse_float(v, 'spawn_noise'),
  ))
  c.upcycle_from = v['upcycle_from']  # '' or the workdir of a dense run (needs slices >= 1)
  return c
