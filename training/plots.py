"""Plots written next to a run: per-modality training loss curves from metrics.jsonl."""

from __future__ import annotations

import os

from training.metrics import read_metrics


def plot_loss_curves(workdir: str, modality_names, report: dict | None = None) -> str:
  """WORKDIR/loss_curves.png: train loss per modality vs step, eval unigram as dashed."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, name in enumerate(modality_names):
    key = f'train/loss/{name}'
    pts = [(r['step'], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if pts:
      color = f'C{i}'
      ax.plot(*zip(*pts), label=f'{name} (train)', color=color)
      mod = (report or {}).get('modalities', {}).get(name)
      if mod:
        ax.axhline(mod['unigram_loss'], ls='--', color=color, alpha=0.6,
                   label=f'{name} unigram (eval)')
        ax.plot([report['step']], [mod['loss']], 'o', color=color,
                label=f'{name} (eval)')
  ax.set_xlabel('step')
  ax.set_ylabel('next-token loss (nats)')
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, 'loss_curves.png')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
