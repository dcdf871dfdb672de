"""THE table of trainers by name (`config.trainer`, default 'decoder'): train.py and eval.py
look the config's up here and call its train / evaluate (training/trainer.py).

  decoder  next-token training of the decoder families (models/families.py): training/
  imp      alternating gradient descent over tasks: projects/imp/

A new trainer writes its own step, reusing training/run.py (mesh, state, checkpoints,
writers, the step loop), and adds one line here.
"""

from projects.imp import trainer as imp_trainer
from training import trainer as decoder_trainer
from training.trainer import Trainer

TRAINERS: dict[str, Trainer] = {
    'decoder': decoder_trainer.DECODER,
    'imp': imp_trainer.TRAINER,
}


def get(config) -> Trainer:
  name = config.get('trainer', 'decoder')
  if name not in TRAINERS:
    raise ValueError(f'config.trainer={name!r} is not one of {sorted(TRAINERS)}')
  return TRAINERS[name]
