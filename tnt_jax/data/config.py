"""What text (or synthetic task) to train on and how to cut it: one frozen dataclass, checked
when built."""

from __future__ import annotations

import dataclasses

from tnt_jax.data import tasks
from tnt_jax.data.documents import check_validation_fraction

TASK_SOURCES = ("mqar", "needle")
SOURCES = ("stdlib", "files", "tokens") + TASK_SOURCES
# The synthetic tasks' fields (a config passes them through only when it sets them).
TASK_FIELDS = ("mqar_vocab_size", "mqar_pairs", "mqar_alpha", "mqar_filler", "needle_depth",
               "needle_key_digits", "needle_value_digits", "task_validation_batches")


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
  """source: "stdlib" (the Python standard library's .py files, no download), "files" (byte-level
    text of `path`), "tokens" (a directory written by experiments/prepare_tokens.py), or a
    synthetic memory task (tnt_jax/data/tasks/): "mqar" (multi-query associative recall) or
    "needle" (needle in a haystack, byte level), scored on the answers only.
  path: files: a file or glob, or several joined by commas; tokens: the shard directory;
    needle: the haystack text file or glob ("": random printable bytes); mqar: none.
  seq_len, batch_size: each batch is [batch_size, seq_len]; batch_size is the global batch.
  seed: row shuffle of the train split (epoch e uses seed + e); in [0, 2**32).
  validation_fraction: share of documents (or of a single file's bytes) held out; byte sources only
    (token shards carry their split).
  max_bytes: byte sources read whole files in sorted order up to this many bytes; None: 16 MiB for
    stdlib, no cap for files.
  include_tests: stdlib only: keep the test directories (~30 MiB instead of ~11.5 MiB on 3.11).
  read_threads: grain reader threads; rows are slices of an in-memory or mmapped stream, so 0
    (read on `next`) is fastest on small hosts.
  Synthetic tasks (seq_len is the task's length; seed picks the rows, train and validation
    drawing from disjoint streams; validation_fraction, max_bytes, include_tests are unused):
  mqar_vocab_size, mqar_pairs, mqar_alpha, mqar_filler: tasks.MQAR's vocab_size (id 0 pads,
    then keys, then values), num_pairs, alpha (query-gap power law), filler ("noise" | "pad").
  needle_depth, needle_key_digits, needle_value_digits: tasks.Needle's depth (in [0, 1]; None
    draws it uniformly per row), key_digits, value_digits.
  task_validation_batches: the validation split's fixed number of batches.
  """
  source: str = "stdlib"
  path: str = ""
  seq_len: int = 256
  batch_size: int = 8
  seed: int = 0
  validation_fraction: float = 0.02
  max_bytes: int | None = None
  include_tests: bool = False
  read_threads: int = 0
  mqar_vocab_size: int = 64
  mqar_pairs: int = 8
  mqar_alpha: float = 0.01
  mqar_filler: str = "noise"
  needle_depth: float | None = None
  needle_key_digits: int = 4
  needle_value_digits: int = 4
  task_validation_batches: int = 16

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"source={self.source!r} must be one of {SOURCES}")
    if self.source in ("files", "tokens") and not self.path:
      raise ValueError(f"source={self.source!r} needs a path; got path={self.path!r}")
    if self.seq_len < 1:
      raise ValueError(f"seq_len={self.seq_len} must be >= 1")
    if self.batch_size < 1:
      raise ValueError(f"batch_size={self.batch_size} must be >= 1")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
    check_validation_fraction(self.validation_fraction)
    if self.max_bytes is not None and self.max_bytes < 1:
      raise ValueError(f"max_bytes={self.max_bytes} must be >= 1 (or None for the default)")
    if self.read_threads < 0:
      raise ValueError(f"read_threads={self.read_threads} must be >= 0")
    if self.source in TASK_SOURCES:
      self._check_task()

  def task(self) -> tasks.Task | None:
    """The synthetic task of a task source (None for text sources)."""
    if self.source == "mqar":
      return tasks.MQAR(vocab_size=self.mqar_vocab_size, num_pairs=self.mqar_pairs,
                        alpha=self.mqar_alpha, filler=self.mqar_filler)
    if self.source == "needle":
      return tasks.Needle(depth=self.needle_depth, haystack=self.path,
                          key_digits=self.needle_key_digits,
                          value_digits=self.needle_value_digits)
    return None

  def _check_task(self) -> None:
    if self.source == "mqar" and self.path:
      raise ValueError(f"source='mqar' takes no path; got path={self.path!r}")
    if self.task_validation_batches < 1:
      raise ValueError(f"task_validation_batches={self.task_validation_batches} must be >= 1")
    prefix = "mqar_" if self.source == "mqar" else "needle_"
    fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                       if f.name.startswith(prefix) or f.name in ("path", "seq_len"))
    try:
      self.task().check(self.seq_len)
    except ValueError as e:   # the task names its own parameter; say which config field it is
      raise ValueError(f"source={self.source!r} ({fields}): {e}") from None
