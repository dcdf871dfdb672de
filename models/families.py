"""THE table of decoder families (`config.model.family`): the one line a new family adds.

Each entry is a `models.family.Family`: how to build its spec fields from the config, its
blocks, its parameter counts, checks, and what it offers beyond a plain decoder (stages,
evaluators, a stream layout). Shared code looks a family up here and never compares names.
"""

from models import dense, mamba, moe_ffn, moiie, moma, mot
from models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (
    dense.FAMILY,
    mamba.FAMILY,
    moe_ffn.FAMILY,
    moma.FAMILY,
    moiie.FAMILY,
    mot.FAMILY,
)}


def get(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f'config.model.family={name!r} is not a decoder family '
                     f'{sorted(FAMILIES)} (models/families.py) nor a model a trainer '
                     f'registered (trainers.py imports them all)')
  return FAMILIES[name]
