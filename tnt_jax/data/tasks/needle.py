"""Needle in a haystack, byte level (vocabulary 256, the byte LMs' own), as a token row.

A row of length T (T + 1 bytes, inputs = bytes[:-1], targets = bytes[1:]):

    haystack ... MARK k1..kK SEP v1..vV haystack ...  MARK k1..kK SEP v1..vV
                 <------ the needle, at `depth` ----->  <---- the query: last ---->
                                                                         ^^^^^^ scored

The needle is MARK (byte 1), `key_digits` ASCII digits, SEP (byte 2), `value_digits` ASCII
digits; the row ends by asking the key again, so the model must produce the value bytes: they
are the only scored targets (each predicted from MARK, key, SEP and the value bytes before it).
The haystack fills the first H = T + 1 - n bytes around the needle (n its length); the needle
starts at round(depth * (H - n)): depth 0 is the first byte, 1 right before the query. depth
None draws it uniformly per row.

haystack: "" for noise (uniform printable ASCII, bytes 32..126) or a text file / glob (files
joined by a blank line, read once per process): each row takes a window of H - n bytes at a
uniform offset, with bytes 0, MARK and SEP replaced by spaces so the needle and the query are the
only MARK/SEP in the row.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os

import numpy as np

from tnt_jax.data.tasks.base import Example, Task, check_length

VOCAB_SIZE = 256
EOS_ID = 0
MARK = 1
SEP = 2
NOISE_LO, NOISE_HI = 32, 127     # printable ASCII, [lo, hi)
_DIGIT_0 = ord("0")


@functools.lru_cache(maxsize=8)
def haystack_bytes(path: str) -> np.ndarray:
  """The bytes of a file or glob (sorted, joined by a blank line), cleaned of 0, MARK, SEP."""
  files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
  files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise ValueError(f"haystack={path!r} names no existing file (a text file, or a glob "
                     "matching some; '' is the noise haystack)")
  parts = []
  for f in files:
    with open(f, "rb") as handle:
      parts.append(handle.read())
  text = np.frombuffer(b"\n\n".join(parts), np.uint8).copy()
  text[np.isin(text, (EOS_ID, MARK, SEP))] = ord(" ")
  text.flags.writeable = False
  return text


@dataclasses.dataclass(frozen=True)
class Needle(Task):
  depth: float | None = None
  haystack: str = ""
  key_digits: int = 4
  value_digits: int = 4

  vocab_size = VOCAB_SIZE
  eos_id = EOS_ID

  def __post_init__(self):
    if self.depth is not None and not (math.isfinite(self.depth) and 0 <= self.depth <= 1):
      raise ValueError(f"depth={self.depth} must be in [0, 1] (or None: uniform per row)")
    for name in ("key_digits", "value_digits"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.haystack:
      haystack_bytes(self.haystack)   # raises if missing; cached for the rows

  @property
  def needle_length(self) -> int:
    return self.key_digits + self.value_digits + 2

  def check(self, length: int) -> None:
    n = self.needle_length
    check_length(length, 2 * n - 1, f"the needle and the query ({n} bytes each: MARK, "
                 f"key_digits={self.key_digits}, SEP, value_digits={self.value_digits})")
    if self.haystack:
      have, need = len(haystack_bytes(self.haystack)), length + 1 - 2 * n
      if have < need:
        raise ValueError(f"haystack={self.haystack!r} holds {have} bytes; length={length} "
                         f"needs {need} of text")

  def example(self, rng: np.random.Generator, length: int) -> Example:
    """truth: key [key_digits] and value [value_digits] (ASCII digit bytes), needle_start (its
    MARK's index in the row's bytes), depth (the one used)."""
    n = self.needle_length
    room = length + 1 - n                       # haystack + needle, before the query
    key = _DIGIT_0 + rng.integers(0, 10, size=self.key_digits)
    value = _DIGIT_0 + rng.integers(0, 10, size=self.value_digits)
    needle = np.concatenate([[MARK], key, [SEP], value])
    depth = rng.uniform() if self.depth is None else self.depth
    start = int(round(depth * (room - n)))
    if self.haystack:
      text = haystack_bytes(self.haystack)
      offset = int(rng.integers(0, len(text) - (room - n) + 1))
      hay = text[offset:offset + room - n]
    else:
      hay = rng.integers(NOISE_LO, NOISE_HI, size=room - n)
    tokens = np.concatenate([hay[:start], needle, hay[start:], needle]).astype(np.int32)
    answer_positions = np.arange(length - self.value_digits, length, dtype=np.int32)
    return Example(tokens, answer_positions,
                   {"key": key.astype(np.int32), "value": value.astype(np.int32),
                    "needle_start": np.int32(start), "depth": np.float64(depth)})


def needle_batch(seed, length: int, batch_size: int = 1, *, first_row: int = 0,
                 with_truth: bool = False, **task):
  """`Needle(**task).batch(seed, length, batch_size, ...)`: see Needle and Task.batch."""
  return Needle(**task).batch(seed, length, batch_size, first_row=first_row,
                              with_truth=with_truth)
