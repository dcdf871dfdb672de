"""What a trainer is: the three functions train.py and eval.py call (trainers.py holds the
table by name, `config.trainer`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from training import evaluate, loop, validate


@dataclasses.dataclass(frozen=True)
class Trainer:
  # (config, workdir, *, stop_at=None, allow_config_change=False) -> last logged scalars
  train: Callable[..., dict]
  evaluate: Callable[..., dict]  # (config, workdir) -> eval.json's report
  validate: Callable[..., tuple]  # (config, num_devices) -> mesh shape; ValueError if bad


# The decoder families of models/families.py (dense, moe, moma, mot): next-token training
# of one sequence model, its stages and evaluators.
DECODER = Trainer(train=loop.train, evaluate=evaluate.evaluate, validate=validate.validate)
