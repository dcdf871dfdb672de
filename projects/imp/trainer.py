"""IMP as a trainer (trainers.py: `config.trainer='imp'`)."""

from projects.imp import evaluate, train, validate
from training.trainer import Trainer

TRAINER = Trainer(train=train.train, evaluate=evaluate.evaluate, validate=validate.validate)
