"""Training stages by name (`config.stage`, default 'main'): what a stage trains, from what it
starts, with which loss and where its run lives - as data, so the trainer never branches on
the stage.

  main  every parameter but the auxiliary routers; a fresh init (or `upcycle_from=DIR`'s
        upcycled checkpoint); the language-model loss; the run in WORKDIR
  aux   only the auxiliary routers (MoMa and MoD causal-inference routers), the rest frozen
        exactly; starts from the main run's latest checkpoint in WORKDIR; their BCE against
        the batch routing; the run in WORKDIR/aux

A family lists the stages it supports (`Family.stages`). The initialisers named here are in
training/warm_start.py INITIALIZERS, the losses in training/step.py LOSSES.
"""

from __future__ import annotations

import dataclasses
import os
import re

AUX_ROUTERS = r'(^|/)aux_routers?(/|$)'  # MoMa's AuxRouters and MoD's aux_router


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  trainable: str  # regex searched in each parameter's path ('blocks/0/ffn/w_up')
  loss: str  # a key of training/step.py LOSSES
  init: str  # a key of training/warm_start.py INITIALIZERS for a run's first start
  subdir: str = ''  # the run's directory under WORKDIR

  def trains(self, path: str) -> bool:
    return re.search(self.trainable, path) is not None


STAGES = {
    'main': Stage('main', trainable=rf'^(?!.*{AUX_ROUTERS})', loss='lm', init='fresh'),
    'aux': Stage('aux', trainable=AUX_ROUTERS, loss='aux_router', init='main_run',
                 subdir='aux'),
}


def stage_of(config) -> Stage:
  name = config.get('stage', 'main')
  if name not in STAGES:
    raise ValueError(f'config.stage={name!r} is not one of {tuple(STAGES)}')
  return STAGES[name]


def initializer(config) -> str:
  """The INITIALIZERS entry of a run's first start: `upcycle_from=DIR` upcycles a main
  stage; otherwise the stage's own."""
  stage = stage_of(config)
  if config.get('upcycle_from'):
    if stage.init != 'fresh':
      raise ValueError(f'config.upcycle_from applies to the main stage, not '
                       f'stage={stage.name!r}')
    return 'upcycle'
  return stage.init


def run_dir(config, workdir: str) -> str:
  """Where a run keeps its checkpoints and metrics: WORKDIR, or WORKDIR/<subdir>."""
  subdir = stage_of(config).subdir
  return os.path.join(workdir, subdir) if subdir else workdir


def check(config, supported: tuple[str, ...]) -> None:
  """The stage exists, the family supports it, and its initialiser applies."""
  stage = stage_of(config)
  if stage.name not in supported:
    raise ValueError(f'config.stage={stage.name!r}: model.family={config.model.family!r} '
                     f'has the stages {supported}')
  initializer(config)
