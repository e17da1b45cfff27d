"""Bits per token (bits per byte for byte-level text) of a model on held-out batches, per length.

    bits = bits_per_token(logits_fn, batches)          # logits_fn(inputs_BxT) -> [B, T, V]
    rows = length_sweep(logits_fn, make_batches, [512, 2048, 8192])

Every scored token (loss_mask > 0) counts once; the result is the mean next-token cross-entropy
in bits. A model whose logits are uniform over V tokens scores exactly log2(V) (8 for bytes).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable, Sequence

import numpy as np


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def bits_per_token(logits_fn: Callable, batches: Iterable[dict]) -> tuple[float, int]:
  """(mean bits per scored token, number of scored tokens) over `batches` (dicts with inputs,
  targets, loss_mask [B, T])."""
  total, count = 0.0, 0
  for batch in batches:
    logp = _log_softmax(logits_fn(batch["inputs"]))
    targets = np.asarray(batch["targets"])
    mask = np.asarray(batch["loss_mask"]) > 0
    if logp.shape[:2] != targets.shape:
      raise ValueError(f"logits shape {logp.shape} does not match targets {targets.shape}")
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    total -= float(picked[mask].sum())
    count += int(mask.sum())
  if count == 0:
    raise ValueError("no scored tokens: the batches are empty or fully masked")
  return total / count / math.log(2), count


def length_sweep(logits_fn: Callable, make_batches: Callable[[int], Iterable[dict]],
                 lengths: Sequence[int], log=print, unit: str = "bits per token"
                 ) -> list[dict]:
  """bits_per_token at each context length; make_batches(length) gives that length's batches."""
  rows = []
  for length in lengths:
    start = time.perf_counter()
    bits, count = bits_per_token(logits_fn, make_batches(length))
    rows.append({"length": int(length), "bits_per_token": bits, "tokens": count,
                 "seconds": time.perf_counter() - start})
    log(f"length {length:>6}: {bits:.4f} {unit} over {count:,} tokens "
        f"({rows[-1]['seconds']:.1f} s)")
  return rows


def plot_length_sweep(rows_by_model: dict[str, list[dict]], path: str, *,
                      train_length: int | None = None, unit: str = "bits per token") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, rows in rows_by_model.items():
    ax.plot([r["length"] for r in rows], [r["bits_per_token"] for r in rows], "o-", label=name)
  if train_length:
    ax.axvline(train_length, color="gray", ls="--", lw=1, label="training length")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel(unit)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
