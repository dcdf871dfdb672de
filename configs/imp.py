"""IMP: one shared encoder trained on several tasks by alternating gradient descent (AGD):
every optimizer step takes one batch of one task and updates on that task's loss alone
(SPEC.md §4; projects/imp/).

Args: a size from configs/common.py SIZES, then variants:
  schedule=sample   sample: a task per step with the tasks' weights (the paper);
                    cycle: the tasks in order, task i every `interval`-th pass (released code)
  mode=agd          agd: one task per step; summed: every task's batch in every step, the
                    losses weighted and summed (the baseline AGD is compared with)
  moe=0             MoE FFNs (expert choice, capacity 1.0) in the last `moe` encoder layers
  mask=1            1: a step on task A changes only the parameters A's loss reaches (no
                    momentum or weight-decay drift elsewhere); 0: plain updates of everything
  attn_gate=none    gated attention in the encoder (model.attn_gate, docs/gates.md): none |
                    headwise | elementwise
e.g. `configs/imp.py:tiny,schedule=cycle`, `configs/imp.py:tiny,moe=1,mode=summed`.

Tasks on the embedded mm_shapes data (`config.tasks.<name>`; a task may read another TFDS
dataset by name with `dataset=`): shape classification at 32x32 and at 16x16 (the same
images, a second input signature), image-text contrastive (InfoNCE with a learned
temperature) and caption language modelling.
"""

import ml_collections

from configs import common
from data import shapes

VARIANTS = {'schedule': 'sample', 'mode': 'agd', 'moe': '0', 'mask': '1',
            **common.MODEL_VARIANTS}


def _task(kind, image_size, batch_size, weight, interval, text_len=0, head=''):
  return ml_collections.ConfigDict(dict(
      kind=kind,  # projects/imp/tasks.py KINDS: classify | contrastive | caption
      dataset='',  # '' = config.data.tfds_name
      head=head,  # classify: its head in model.imp.classifiers ('' = the only one)
      image_size=image_size,  # R: images are resized to R x R (any multiple of patch_size)
      text_len=text_len,  # L: [BOS] caption [EOS], PAD-padded or cut
      batch_size=batch_size,  # global, per step of this task
      weight=weight,  # schedule=sample: relative frequency; mode=summed: loss weight
      interval=interval,  # schedule=cycle: one step every `interval` passes
  ))


def get_config(arg: str = 'tiny'):
  size, v = common.parse_arg(arg, allowed=VARIANTS, data=False)
  c = common.base_config(size, attn_gate=v['attn_gate'])
  c.model.family = 'imp'
  c.trainer = 'imp'  # projects/imp: alternating gradient descent over tasks
  if size == 'tiny':
    c.learning_rate = 1e-3  # 3e-3 (the size table's) stalls the shape classifier
  c.model.imp = ml_collections.ConfigDict(dict(
      patch_size=4,
      max_text_len=64,
      # classifier heads (IMP: one per dataset): name -> number of classes
      classifiers=ml_collections.ConfigDict({'shapes': 6}),  # mm_shapes' shape kinds
      proj_dim=64,  # contrastive embedding width
      qk_norm=True,
      moe_last=common.parse_int(v, 'moe'),  # MoE FFN in the last N encoder layers (0: dense)
      moe=ml_collections.ConfigDict(dict(
          num_experts=4, router='expert_choice', capacity_factor=1.0,
          mlp_dim=c.model.mlp_dim, group_size=0, load_balance_coef=0.0,
          z_loss_coef=1e-3, jitter=0.0)),
  ))
  c.agd = ml_collections.ConfigDict(dict(
      schedule=v['schedule'],  # sample | cycle (projects/imp/schedules.py)
      mode=v['mode'],  # agd | summed
      mask_updates=common.parse_bool(v, 'mask'),
  ))
  scale = 1 if size == 'tiny' else 4
  c.tasks = ml_collections.ConfigDict(dict(
      classify32=_task('classify', 32, 32 * scale, weight=1.0, interval=1, head='shapes'),
      classify16=_task('classify', 16, 32 * scale, weight=0.5, interval=2, head='shapes'),
      contrastive=_task('contrastive', 32, 32 * scale, weight=1.0, interval=1, text_len=64),
      caption=_task('caption', 32, 32 * scale, weight=1.0, interval=1, text_len=64),
  ))
  c.seq_len = 0  # unused: each task has its own shapes
  # Zero-shot classification (eval.py): each class is the mean embedding of these prompts
  # filled with its label name (CLIP's prompt ensembling). For mm_shapes: the caption
  # templates with every size, colour and position ('a small red {} at the top left', ...;
  # 576 prompts). For another dataset set your own, e.g. ('a photo of a {}.',).
  c.eval.zeroshot_prompts = shapes.kind_prompts()
  return c
