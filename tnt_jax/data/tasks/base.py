"""What every synthetic task shares: per-row seeding, the batch dict, the ground-truth answers.

A task generates one row at a time: `example(rng, length)` returns the length + 1 tokens of the
row (inputs are tokens[:-1], targets tokens[1:]), the target indices that are scored, and the
ground truth as the generator chose it (which key went where, which value it carries), so a test
or an evaluation can check the answers without trusting the batch.

Seeding: row r of a batch drawn with seed s uses its own generator, SeedSequence([*s, r]); so a
host that generates only rows [lo, hi) of a global batch gets exactly those rows of it, and any
two different seed tuples give independent streams (the pipeline uses (seed, split) for train and
validation, so the two never share a row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
Seed = int | Sequence[int] | np.random.Generator


@dataclasses.dataclass(frozen=True)
class Example:
  """One row: tokens_L1 [length + 1] int32; answer_positions [A] int32, the target indices t
  whose targets[t] = tokens[t + 1] are scored; truth: the generator's own record (arrays)."""
  tokens_L1: np.ndarray
  answer_positions: np.ndarray
  truth: dict[str, Any]


def row_rngs(seed: Seed, rows: Sequence[int]) -> list[np.random.Generator]:
  """One generator per row (see module doc); a Generator seed is shared by the rows, in order."""
  if isinstance(seed, np.random.Generator):
    return [seed] * len(rows)
  entropy = [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed]
  if any(s < 0 for s in entropy):
    raise ValueError(f"seed={seed!r} must be a non-negative int or a sequence of them")
  return [np.random.default_rng(np.random.SeedSequence(entropy + [int(r)])) for r in rows]


def assemble(examples: Sequence[Example], length: int) -> dict[str, np.ndarray]:
  """Rows -> the trainer's batch dict (tnt_jax/data/packing.py): one segment per row, positions
  0..T-1, loss_mask 1 exactly on the answer positions."""
  tokens_BxL1 = np.stack([e.tokens_L1 for e in examples]).astype(np.int32)
  batch = len(examples)
  loss_mask_BxT = np.zeros((batch, length), np.float32)
  for i, e in enumerate(examples):
    loss_mask_BxT[i, e.answer_positions] = 1.0
  return {
      "inputs": np.ascontiguousarray(tokens_BxL1[:, :-1]),
      "targets": np.ascontiguousarray(tokens_BxL1[:, 1:]),
      "loss_mask": loss_mask_BxT,
      "segment_ids": np.ones((batch, length), np.int32),
      "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
  }


def stack_truth(examples: Sequence[Example]) -> dict[str, np.ndarray]:
  """The examples' ground truth, each entry stacked over rows [B, ...]."""
  keys = examples[0].truth.keys()
  return {k: np.stack([np.asarray(e.truth[k]) for e in examples]) for k in keys}


class Task:
  """A generator of rows; subclasses are frozen dataclasses that check their fields when built
  and define vocab_size, eos_id, check(length) and example(rng, length)."""

  vocab_size: int
  eos_id: int

  def check(self, length: int) -> None:
    raise NotImplementedError

  def example(self, rng: np.random.Generator, length: int) -> Example:
    raise NotImplementedError

  def batch(self, seed: Seed, length: int, batch_size: int = 1, *, first_row: int = 0,
            with_truth: bool = False):
    """Rows first_row .. first_row + batch_size - 1 of the stream `seed` as a batch dict of
    [batch_size, length] arrays; with_truth=True also returns the generator's ground truth
    ({name: [batch_size, ...]}, see the task's example())."""
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    if first_row < 0:
      raise ValueError(f"first_row={first_row} must be >= 0")
    self.check(length)
    rows = range(first_row, first_row + batch_size)
    examples = [self.example(rng, length) for rng in row_rngs(seed, rows)]
    batch = assemble(examples, length)
    return (batch, stack_truth(examples)) if with_truth else batch

  def params(self) -> dict[str, Any]:
    """The task's fields, JSON-serialisable (the pipeline's state fingerprint)."""
    return {"task": type(self).__name__, **dataclasses.asdict(self)}


def check_length(length: int, minimum: int, why: str) -> None:
  if not isinstance(length, (int, np.integer)) or length < minimum:
    raise ValueError(f"length={length!r} is too short: {why} need length >= {minimum}")
