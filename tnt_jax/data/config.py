"""What text to train on and how to cut it: one frozen dataclass, checked when built."""

from __future__ import annotations

import dataclasses

from tnt_jax.data.documents import check_validation_fraction

SOURCES = ("stdlib", "files", "tokens")


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
  """source: "stdlib" (the Python standard library's .py files, no download), "files" (byte-level
    text of `path`), or "tokens" (a directory written by experiments/prepare_tokens.py).
  path: files: a file or glob, or several joined by commas; tokens: the shard directory.
  seq_len, batch_size: each batch is [batch_size, seq_len]; batch_size is the global batch.
  seed: row shuffle of the train split (epoch e uses seed + e); in [0, 2**32).
  validation_fraction: share of documents (or of a single file's bytes) held out; byte sources only
    (token shards carry their split).
  max_bytes: byte sources read whole files in sorted order up to this many bytes; None: 16 MiB for
    stdlib, no cap for files.
  include_tests: stdlib only: keep the test directories (~30 MiB instead of ~11.5 MiB on 3.11).
  read_threads: grain reader threads; rows are slices of an in-memory or mmapped stream, so 0
    (read on `next`) is fastest on small hosts.
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
