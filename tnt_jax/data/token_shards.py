"""Pre-tokenized corpora on disk: `.npy` shards of token ids plus a `meta.json` describing them.

    out_dir/meta.json         {"format": "tnt_jax.tokens/1", "vocab_size": 50257,
                               "eos_id": 50256, "tokenizer": "gpt2", "dtype": "uint16",
                               "shards": {"train": ["train_00000.npy", ...], "validation": [...]},
                               "num_tokens": {...}, "num_documents": {...}}
    out_dir/train_00000.npy   1-D uint16 (uint32 if vocab_size > 65536): doc EOS doc EOS ...

Each document is followed by `eos_id`; a shard holds whole documents.
`experiments/prepare_tokens.py` writes these; the "tokens" source reads them memory-mapped."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from tnt_jax.data.documents import SPLITS, check_split
from tnt_jax.data.stream import TokenStream

META_FILENAME = "meta.json"
FORMAT = "tnt_jax.tokens/1"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclasses.dataclass(frozen=True)
class TokenMeta:
  vocab_size: int
  eos_id: int
  tokenizer: str
  shards: dict[str, list[str]]
  num_tokens: dict[str, int]
  num_documents: dict[str, int]

  def to_json(self) -> dict:
    return {"format": FORMAT, "dtype": token_dtype(self.vocab_size).name,
            **dataclasses.asdict(self)}


def meta_path(directory: str) -> str:
  """`directory/meta.json`; a path to the meta.json itself is accepted too."""
  if os.path.basename(directory) == META_FILENAME:
    return directory
  return os.path.join(directory, META_FILENAME)


def read_meta(directory: str) -> TokenMeta:
  """Parse and check meta.json; every problem is a ValueError naming the file."""
  path = meta_path(directory)
  if not os.path.isfile(path):
    raise ValueError(f"token directory {directory!r} has no {META_FILENAME} (expected {path!r}); "
                     "write one with experiments/prepare_tokens.py")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path!r} is not valid JSON: {e}") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{path!r} must hold a JSON object, got {type(raw).__name__}")
  if raw.get("format") != FORMAT:
    raise ValueError(f"{path!r}: format={raw.get('format')!r} must be {FORMAT!r}")
  for key in ("vocab_size", "eos_id"):
    if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool):
      raise ValueError(f"{path!r}: {key}={raw.get(key)!r} must be an integer")
  vocab_size, eos_id = raw["vocab_size"], raw["eos_id"]
  if vocab_size < 1 or not 0 <= eos_id < vocab_size:
    raise ValueError(f"{path!r}: needs vocab_size >= 1 and 0 <= eos_id < vocab_size, got "
                     f"{vocab_size=}, {eos_id=}")
  shards = raw.get("shards")
  if (not isinstance(shards, dict) or set(shards) != set(SPLITS) or
      not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in shards.values())):
    raise ValueError(f"{path!r}: shards={shards!r} must map each of {SPLITS} "
                     "to a list of file names")
  counts = {}
  for key in ("num_tokens", "num_documents"):
    value = raw.get(key, {})
    if not isinstance(value, dict):
      raise ValueError(f"{path!r}: {key}={value!r} must be an object keyed by split")
    counts[key] = value
  return TokenMeta(vocab_size=vocab_size, eos_id=eos_id, tokenizer=str(raw.get("tokenizer", "")),
                   shards=shards, **counts)


def load_token_stream(directory: str, split: str) -> tuple[TokenStream, TokenMeta]:
  """The split's shards, memory-mapped, as one stream; shapes and dtypes checked against meta."""
  check_split(split)
  meta = read_meta(directory)
  base = os.path.dirname(meta_path(directory))
  dtype = token_dtype(meta.vocab_size)
  pieces = []
  for name in meta.shards[split]:
    shard = os.path.join(base, name)
    if not os.path.isfile(shard):
      raise ValueError(f"shard {shard!r} listed in {meta_path(directory)!r} does not exist")
    array = np.load(shard, mmap_mode="r")
    if array.ndim != 1 or array.dtype.kind != "u" or array.dtype.itemsize > dtype.itemsize:
      raise ValueError(f"shard {shard!r} must be 1-D unsigned <= {dtype.name} (vocab_size="
                       f"{meta.vocab_size}), got shape={array.shape} dtype={array.dtype}")
    pieces.append(array)
  return TokenStream(pieces), meta


class ShardWriter:
  """Appends documents (each followed by EOS) and writes `{split}_{i:05d}.npy` shards of whole
  documents, a new shard once one holds at least `shard_tokens` tokens."""

  def __init__(self, directory: str, split: str, vocab_size: int, eos_id: int,
               shard_tokens: int = 2**27):
    check_split(split)
    if shard_tokens < 1:
      raise ValueError(f"{shard_tokens=} must be >= 1")
    self._directory, self._split, self._eos_id = directory, split, eos_id
    self._vocab_size, self._shard_tokens = vocab_size, shard_tokens
    self._dtype = token_dtype(vocab_size)
    self._buffer: list[np.ndarray] = []
    self._buffered = 0
    self.shards: list[str] = []
    self.num_tokens = 0
    self.num_documents = 0

  def add(self, ids) -> None:
    ids = np.asarray(ids)
    if ids.ndim != 1:
      raise ValueError(f"document ids must be 1-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= self._vocab_size):
      raise ValueError(f"token ids must be in [0, vocab_size={self._vocab_size}), got "
                       f"[{ids.min()}, {ids.max()}]")
    document = np.append(ids.astype(self._dtype), np.asarray([self._eos_id], self._dtype))
    self._buffer.append(document)
    self._buffered += len(document)
    self.num_documents += 1
    if self._buffered >= self._shard_tokens:
      self._flush()

  def _flush(self) -> None:
    if not self._buffer:
      return
    name = f"{self._split}_{len(self.shards):05d}.npy"
    np.save(os.path.join(self._directory, name), np.concatenate(self._buffer))
    self.shards.append(name)
    self.num_tokens += self._buffered
    self._buffer, self._buffered = [], 0

  def close(self) -> None:
    self._flush()


def write_meta(directory: str, meta: TokenMeta) -> None:
  """Written last and atomically, so a directory with a meta.json holds complete shards."""
  path = meta_path(directory)
  with open(path + ".tmp", "w") as f:
    json.dump(meta.to_json(), f, indent=2)
  os.replace(path + ".tmp", path)
