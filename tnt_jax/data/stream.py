"""A flat token stream over one or more 1-D arrays, read by position.

Token shards stay memory-mapped: the stream is their virtual concatenation, so a packed row that
straddles two shards is read from both without ever building the whole corpus in memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class TokenStream:
  """Concatenation of 1-D integer arrays (in memory or memory-mapped), read as int32 slices."""

  def __init__(self, pieces: Sequence[np.ndarray]):
    for i, piece in enumerate(pieces):
      if piece.ndim != 1 or piece.dtype.kind not in "ui":
        raise ValueError(f"stream piece {i} must be a 1-D integer array, got "
                         f"shape={piece.shape} dtype={piece.dtype}")
    self._pieces = [p for p in pieces if len(p)]
    lengths = [len(p) for p in self._pieces]
    self._starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) as int32; clipped to the stream, so reading past the end is short."""
    start, stop = max(start, 0), min(stop, len(self))
    if start >= stop:
      return np.zeros((0,), np.int32)
    first = int(np.searchsorted(self._starts, start, side="right")) - 1
    parts = []
    i = first
    while start < stop:
      piece_start = int(self._starts[i])
      piece_stop = min(stop, int(self._starts[i + 1]))
      parts.append(self._pieces[i][start - piece_start:piece_stop - piece_start])
      start, i = piece_stop, i + 1
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out.astype(np.int32)
