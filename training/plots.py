"""Plots written next to a run: per-modality training loss curves from metrics.jsonl,
MoMa's per-layer expert load by modality from eval.json, and IMP's per-task loss curves."""

from __future__ import annotations

import io
import os

import numpy as np

from training import storage
from training.metrics import read_metrics


def _save(fig, path: str) -> None:
  """PNG of `fig` at `path` (a local file or an object), then the figure closed."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=110)
  storage.write_bytes(path, buf.getvalue())


def plot_loss_curves(workdir: str, modality_names, report: dict | None = None) -> str:
  """WORKDIR/loss_curves.png: train loss per modality vs step, eval unigram as dashed and
  the exact floor (embedded datasets) as dotted."""
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
        if 'floor' in mod:
          ax.axhline(mod['floor'], ls=':', color=color, alpha=0.8,
                     label=f'{name} floor (eval)')
        ax.plot([report['step']], [mod['loss']], 'o', color=color,
                label=f'{name} (eval)')
  ax.set_xlabel('step')
  ax.set_ylabel('next-token loss (nats)')
  ax.set_title(os.path.basename(storage.resolve(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = storage.join(workdir, 'loss_curves.png')
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path


def plot_task_curves(workdir: str) -> str | None:
  """WORKDIR/task_curves.png (IMP): each task's training loss (`train/<task>/task_loss`)
  vs step, one panel per task. None if metrics.jsonl has no task losses."""
  rows = read_metrics(workdir)
  tasks = sorted({k.split('/')[1] for r in rows for k in r
                  if k.startswith('train/') and k.endswith('/task_loss')})
  if not tasks:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    key = f'train/{task}/task_loss'
    ax.plot(*zip(*[(r['step'], r[key]) for r in rows if key in r]))
    ax.set_title(task, fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel('training loss (task objective)')
  fig.suptitle(os.path.basename(storage.resolve(workdir)), fontsize=9)
  fig.tight_layout()
  path = storage.join(workdir, 'task_curves.png')
  _save(fig, path)
  plt.close(fig)
  return path


def plot_routing_load(workdir: str, report: dict, *, max_cols: int = 4) -> str | None:
  """WORKDIR/routing_load.png: per MoMa layer, a modality x expert heat map of the share
  of each modality's tokens each expert processed (eval.json `routing.layers[i].load`), and
  below it the causal pass's (`causal_load`) when there is one. Layers wrap after
  `max_cols` panels. None if the report has no loads."""
  layers = [e for e in report.get('routing', {}).get('layers', []) if 'load' in e]
  if not layers:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  passes = [('load', 'batch routing')]
  if any('causal_load' in e for e in layers):
    passes.append(('causal_load', 'causal (aux routers)'))
  matrix = lambda load: (list(load), list(next(iter(load.values()))),
                         np.array([list(row.values()) for row in load.values()]))
  vmax = max(max(float(matrix(e[k])[2].max()) for e in layers for k, _ in passes if k in e),
             1e-9)
  modalities, experts, _ = matrix(layers[0]['load'])
  cols = min(max_cols, len(layers))
  grid_rows = -(-len(layers) // cols) * len(passes)
  fig, axes = plt.subplots(grid_rows, cols, squeeze=False, layout='constrained',
                           figsize=(cols * (1.2 + 0.4 * len(experts)) + 1.0,
                                    grid_rows * (1.4 + 0.45 * len(modalities)) + 0.4))
  for ax in axes.flat:
    ax.axis('off')
  image = None
  for n, entry in enumerate(layers):
    for p, (key, label) in enumerate(passes):
      if key not in entry:
        continue
      ax = axes[(n // cols) * len(passes) + p, n % cols]
      ax.axis('on')
      rows, names, values = matrix(entry[key])
      image = ax.imshow(values, vmin=0.0, vmax=vmax, cmap='viridis', aspect='auto')
      ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
      ax.set_yticks(range(len(rows)), rows, fontsize=8)
      mod = entry.get('causal_mod_selected_fraction' if p else 'mod_selected_fraction')
      title = f"layer {entry['layer']}" + (f' (MoD {mod:.0%})' if mod is not None else '')
      ax.set_title(title + (f', {label}' if len(passes) > 1 else ''), fontsize=8)
      if values.size <= 64:
        for (r, c), v in np.ndenumerate(values):
          ax.text(c, r, f'{v:.2f}', ha='center', va='center', fontsize=6,
                  color='white' if v < 0.6 * vmax else 'black')
  fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of the modality's tokens")
  fig.suptitle(f"{os.path.basename(storage.resolve(workdir))}: expert load by modality, "
               f"step {report.get('step')}", fontsize=9)
  path = storage.join(workdir, 'routing_load.png')
  _save(fig, path)
  plt.close(fig)
  return path


def plot_samples(path: str, panels, title: str, *, cols: int = 4) -> str:
  """A grid of generations (eval's samples.png, sample.py's PNG): per panel an image
  [H, W, 3] uint8 and its caption; `direction` says which of the two was generated and
  `consistent` (True / False / None) colours the caption (green / red / black)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import textwrap

  rows = max(1, -(-len(panels) // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.4 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, (image, direction, caption, consistent) in zip(axes.flat, panels):
    ax.imshow(image, interpolation='nearest')
    made = 'image' if direction == 'text_to_image' else 'caption'
    mark = {True: ' (consistent)', False: ' (inconsistent)'}.get(consistent, '')
    text = '\n'.join(textwrap.wrap(caption or '(no caption)', 34)[:4])
    ax.set_title(f'generated {made}{mark}\n{text}', fontsize=7,
                 color={True: 'green', False: 'red'}.get(consistent, 'black'))
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)
  return path
