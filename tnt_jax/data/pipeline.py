"""grain pipelines over a packed token stream; the only module that imports grain.

    it = make_lm_iterator(TextDataConfig(seq_len=256, batch_size=8), "train",
                          shard_index=jax.process_index(), shard_count=jax.process_count())
    batch = next(it)          # {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    state = it.get_state()    # JSON-serialisable; save it with the checkpoint
    it.set_state(state)       # on resume: the next batch is the one that followed `state`

Train: rows (packing.py) shuffled by index with grain (epoch e reshuffled with seed + e), repeated
forever, cut into global batches of `batch_size` rows. Validation: rows in stream order, one pass,
the last row and the last batch padded with loss_mask 0, so every token is scored exactly once.

Multi-host: host h of S reads rows [h*b, (h+1)*b) of each global batch, b = batch_size // S, so
concatenating the hosts' k-th batches in host order gives the single-host k-th batch (the layout
`jax.make_array_from_process_local_data` assembles). The state counts global batches, so it
resumes on any number of hosts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from tnt_jax.data import packing
from tnt_jax.data.config import TextDataConfig
from tnt_jax.data.corpus import Corpus, load_corpus
from tnt_jax.data.documents import check_split
from tnt_jax.data.stream import TokenStream


@dataclasses.dataclass(frozen=True)
class _ReadHostRows:
  """Global batch of row ids -> this host's slice of it, packed into the batch dict."""
  stream: TokenStream
  seq_len: int
  eos_id: int
  lo: int
  hi: int

  def __call__(self, row_ids_B: np.ndarray) -> dict[str, np.ndarray]:
    return packing.read_rows(self.stream, row_ids_B[self.lo:self.hi], self.seq_len, self.eos_id)


class LMIterator:
  """Iterator of numpy batch dicts with checkpointable state; wraps grain's DatasetIterator."""

  def __init__(self, iterator, corpus: Corpus, *, split: str, num_rows: int,
               num_batches: int | None, fingerprint: dict[str, Any]):
    self._iterator = iterator
    self._fingerprint = fingerprint
    self.vocab_size = corpus.vocab.vocab_size
    self.eos_id = corpus.vocab.eos_id
    self.num_documents = corpus.num_documents
    self.num_tokens = len(corpus.stream)
    self.split = split
    self.num_rows = num_rows          # per epoch (train) or in the single pass (validation)
    self.num_batches = num_batches    # None: repeats forever

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._iterator.get_state(), "pipeline": dict(self._fingerprint)}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or set(state) != {"grain", "pipeline"}:
      raise ValueError(f"state={state!r} must be a dict from get_state() with keys "
                       "'grain' and 'pipeline'")
    changed = {k: (v, self._fingerprint.get(k)) for k, v in state["pipeline"].items()
               if self._fingerprint.get(k) != v}
    if changed or set(state["pipeline"]) != set(self._fingerprint):
      raise ValueError("state was saved by a different pipeline; "
                       f"(saved, now) = {changed or state['pipeline']}")
    self._iterator.set_state(state["grain"])


def make_lm_iterator(config: TextDataConfig, split: str = "train", *, shard_index: int = 0,
                     shard_count: int = 1, max_batches: int | None = None) -> LMIterator:
  """Batches of this host's rows of `split` (see module doc); train repeats forever unless
  max_batches is given, validation is one deterministic pass (at most max_batches batches)."""
  check_split(split)
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index=}, {shard_count=}")
  if config.batch_size % shard_count:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by "
                     f"shard_count={shard_count} (each host reads batch_size // shard_count rows)")
  if max_batches is not None and max_batches < 1:
    raise ValueError(f"{max_batches=} must be >= 1 (or None)")
  corpus = load_corpus(config, split)
  seq_len, batch_size = config.seq_len, config.batch_size
  if split == "train":
    num_rows = packing.full_rows(len(corpus.stream), seq_len)
    if num_rows == 0:
      raise ValueError(f"train split of source={config.source!r} has {len(corpus.stream)} tokens; "
                       f"seq_len={seq_len} needs at least seq_len + 1 = {seq_len + 1}")
    row_ids = grain.MapDataset.range(num_rows).shuffle(seed=config.seed).repeat()
    num_batches = max_batches
  else:
    num_rows = packing.covering_rows(len(corpus.stream), seq_len)
    num_batches = -(-num_rows // batch_size)
    row_ids = grain.MapDataset.range(num_batches * batch_size)   # rows >= num_rows are padding
    num_batches = num_batches if max_batches is None else min(num_batches, max_batches)
  batches = row_ids.batch(batch_size, drop_remainder=True)
  if num_batches is not None:
    batches = batches[:num_batches]
  per_host = batch_size // shard_count
  batches = batches.map(_ReadHostRows(corpus.stream, seq_len, corpus.vocab.eos_id,
                                      shard_index * per_host, (shard_index + 1) * per_host))
  read_options = grain.ReadOptions(num_threads=config.read_threads,
                                   prefetch_buffer_size=2 * config.read_threads)
  iterator = iter(batches.to_iter_dataset(read_options))
  fingerprint = {"split": split, "seq_len": seq_len, "batch_size": batch_size,
                 "seed": config.seed, "num_tokens": len(corpus.stream)}
  return LMIterator(iterator, corpus, split=split, num_rows=num_rows, num_batches=num_batches,
                    fingerprint=fingerprint)
