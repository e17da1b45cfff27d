"""Scoring a model on the tasks: answer accuracy, the needle (length x depth) grid, its heatmap.

Model-free: a model enters only as `predict_fn(inputs_BxT) -> logits_BxTxV` (numpy or jax
arrays), so evaluation scripts pass a jitted apply of whatever they restored.

    grid = accuracy_grid(predict_fn, [1024, 4096], [0.0, 0.5, 1.0], batch_size=8)
    plot_heatmap(grid, [1024, 4096], [0.0, 0.5, 1.0], "/tmp/needle.png")
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from tnt_jax.data.tasks.needle import Needle


def answer_accuracy(logits_BxTxV, batch: dict, *, exact: bool = False) -> tuple[int, int]:
  """(correct, total) of argmax predictions at the scored positions (loss_mask > 0).

  exact=False counts answer tokens; exact=True counts rows, a row being correct only when all of
  its answer tokens are (rows without answers are skipped)."""
  logits_BxTxV = np.asarray(logits_BxTxV)
  mask_BxT = np.asarray(batch["loss_mask"]) > 0
  targets_BxT = np.asarray(batch["targets"])
  if logits_BxTxV.shape[:2] != targets_BxT.shape:
    raise ValueError(f"logits shape {logits_BxTxV.shape} does not match the batch's "
                     f"[batch, time] = {targets_BxT.shape}")
  right_BxT = (logits_BxTxV.argmax(-1) == targets_BxT) & mask_BxT
  if not exact:
    return int(right_BxT.sum()), int(mask_BxT.sum())
  has_answer_B = mask_BxT.any(-1)
  all_right_B = right_BxT.sum(-1) == mask_BxT.sum(-1)
  return int((all_right_B & has_answer_B).sum()), int(has_answer_B.sum())


def accuracy_grid(predict_fn: Callable, lengths: Sequence[int], depths: Sequence[float], *,
                  batch_size: int = 4, num_batches: int = 1, seed: int = 0,
                  haystack: str = "", key_digits: int = 4, value_digits: int = 4,
                  exact: bool = False) -> np.ndarray:
  """Needle accuracy [len(lengths), len(depths)] (float64 in [0, 1]).

  Each cell scores num_batches batches of batch_size rows, batch b drawn with seed (seed, b):
  every cell of a row of the grid sees the same keys, values and haystack, only the depth
  moves. exact: see answer_accuracy (tokens, or whole values)."""
  if not lengths or not depths:
    raise ValueError(f"need at least one length and one depth; got {lengths=}, {depths=}")
  if num_batches < 1:
    raise ValueError(f"num_batches={num_batches} must be >= 1")
  tasks = [Needle(depth=float(d), haystack=haystack, key_digits=key_digits,
                  value_digits=value_digits) for d in depths]
  for length in lengths:
    tasks[0].check(length)          # fail before any model call
  grid = np.zeros((len(lengths), len(depths)))
  for i, length in enumerate(lengths):
    for j, task in enumerate(tasks):
      correct = total = 0
      for b in range(num_batches):
        batch = task.batch((seed, b), length, batch_size)
        c, t = answer_accuracy(predict_fn(batch["inputs"]), batch, exact=exact)
        correct, total = correct + c, total + t
      grid[i, j] = correct / total
  return grid


def _length_label(length: int) -> str:
  return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def plot_heatmap(grid, lengths: Sequence[int], depths: Sequence[float],
                 path: str | os.PathLike, title: str = "needle accuracy") -> str:
  """Writes grid [len(lengths), len(depths)] as a PNG heatmap (lengths down, depths across,
  each cell labelled in %); returns the path."""
  # Imported here, as in train/metrics.py: the Agg canvas needs no display and leaves pyplot's
  # global backend alone.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  grid = np.asarray(grid, dtype=float)
  if grid.shape != (len(lengths), len(depths)):
    raise ValueError(f"grid shape {grid.shape} must be [len(lengths), len(depths)] = "
                     f"{(len(lengths), len(depths))}")
  fig = Figure(figsize=(1.1 * len(depths) + 2.5, 0.55 * len(lengths) + 1.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
  ax.set_yticks(range(len(lengths)), [_length_label(n) for n in lengths])
  ax.set_xlabel("needle depth")
  ax.set_ylabel("context length")
  for i in range(len(lengths)):
    for j in range(len(depths)):
      ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
  fig.colorbar(image, ax=ax, label="accuracy")
  ax.set_title(title)
  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  return path
