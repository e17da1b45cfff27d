"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), as a token row.

Vocabulary of `vocab_size` ids: 0 is the filler/pad (and end-of-sequence) id; keys are ids
[1, 1 + K), values [1 + K, vocab_size), K = (vocab_size - 1) // 2. A row of length T (T + 1
tokens, inputs = tokens[:-1], targets = tokens[1:]):

    k1 v1 k2 v2 ... kN vN | . . kσ1 vσ1 . . . . kσ2 vσ2 . . ...          (N = num_pairs)
    <- 2N tokens: pairs -> <- queries in 2-token slots, filler ('.') elsewhere ->

N distinct keys, each bound to a distinct value. After the pairs, the rest is cut into
S = (T + 1 - 2N) // 2 two-token slots; each key is asked again once, in its own slot g, as
"key value", so the model is scored at the query key (its target is the value). The slots are
drawn without replacement with P(g) ∝ (g + 1)^(alpha - 1), g = 0 .. S - 1, g counting slots from
the end of the pairs (Zoology's power law, there `power_a`; alpha = 1 is uniform, small alpha puts
most queries close to the pairs but leaves a heavy tail up to the end of the row). The i-th key
takes the i-th slot drawn, so query order is random. Filler: "noise" (Zoology's
random_non_queries: uniform over keys and values, so a key also appears where it is not asked,
unscored) or "pad" (id 0).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tnt_jax.data.tasks.base import Example, Task, check_length

PAD_ID = 0
FIRST_KEY = 1
FILLERS = ("noise", "pad")


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
  vocab_size: int = 64
  num_pairs: int = 8
  alpha: float = 0.01
  filler: str = "noise"

  eos_id = PAD_ID

  def __post_init__(self):
    if self.num_pairs < 1:
      raise ValueError(f"num_pairs={self.num_pairs} must be >= 1")
    if self.vocab_size < 2 * self.num_pairs + 1:
      raise ValueError(
          f"vocab_size={self.vocab_size} is too small for num_pairs={self.num_pairs}: keys and "
          f"values are disjoint halves of the vocab_size - 1 non-pad ids and the keys (and the "
          f"values) of a row are distinct, so vocab_size must be >= 2 * num_pairs + 1 = "
          f"{2 * self.num_pairs + 1}")
    if not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"alpha={self.alpha} must be > 0 (power law (g+1)^(alpha-1) of the "
                       "query slot g; 1 is uniform)")
    if self.filler not in FILLERS:
      raise ValueError(f"filler={self.filler!r} must be one of {FILLERS}")

  @property
  def num_keys(self) -> int:
    return (self.vocab_size - 1) // 2

  @property
  def first_value(self) -> int:
    return FIRST_KEY + self.num_keys

  def num_slots(self, length: int) -> int:
    return (length + 1 - 2 * self.num_pairs) // 2

  def check(self, length: int) -> None:
    n = self.num_pairs
    check_length(length, 4 * n - 1, f"num_pairs={n} pairs and their {n} queries take "
                 f"4 * num_pairs = {4 * n} of the length + 1 tokens, so they")

  def slot_probabilities(self, length: int) -> np.ndarray:
    """P(g) of one query slot g = 0 .. S - 1 (the first key's slot has exactly this law)."""
    log_p = (self.alpha - 1.0) * np.log1p(np.arange(self.num_slots(length)))
    p = np.exp(log_p - log_p.max())
    return p / p.sum()

  def example(self, rng: np.random.Generator, length: int) -> Example:
    """truth: keys [N] and values [N] in pair order, slots [N] (key i is asked in slot
    slots[i]) and query_positions [N] (its target index, 2N + 2 slots[i])."""
    n, num_slots = self.num_pairs, self.num_slots(length)
    keys = FIRST_KEY + rng.choice(self.num_keys, n, replace=False)
    values = self.first_value + rng.choice(self.vocab_size - self.first_value, n, replace=False)
    # n draws without replacement from P(g) ∝ (g+1)^(alpha-1), in draw order: the top n of
    # log P + Gumbel noise (Gumbel-top-k), O(S) instead of numpy's sequential weighted choice.
    scores = (self.alpha - 1.0) * np.log1p(np.arange(num_slots)) + rng.gumbel(size=num_slots)
    top = np.argpartition(-scores, n - 1)[:n]
    slots = top[np.argsort(-scores[top], kind="stable")]
    if self.filler == "noise":
      tokens = rng.integers(FIRST_KEY, self.vocab_size, size=length + 1)
    else:
      tokens = np.full(length + 1, PAD_ID)
    tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
    query_positions = 2 * n + 2 * slots
    tokens[query_positions], tokens[query_positions + 1] = keys, values
    return Example(tokens.astype(np.int32), np.sort(query_positions).astype(np.int32),
                   {"keys": keys.astype(np.int32), "values": values.astype(np.int32),
                    "slots": slots.astype(np.int32),
                    "query_positions": query_positions.astype(np.int32)})


def mqar_batch(seed, length: int, batch_size: int = 1, *, first_row: int = 0,
               with_truth: bool = False, **task):
  """`MQAR(**task).batch(seed, length, batch_size, ...)`: see MQAR and Task.batch."""
  return MQAR(**task).batch(seed, length, batch_size, first_row=first_row,
                            with_truth=with_truth)
