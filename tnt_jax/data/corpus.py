"""One split of one source as a flat token stream: doc EOS doc EOS ..., with its vocabulary.

Byte-level sources (stdlib, files) use the 256 byte values as tokens and byte 0 (NUL, absent from
text files) as the end-of-document id; a NUL inside a file would read as a document end. Token
shards bring their own vocab_size and eos_id from meta.json.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tnt_jax.data import documents, token_shards
from tnt_jax.data.config import TextDataConfig
from tnt_jax.data.stream import TokenStream

BYTE_VOCAB_SIZE = 256
BYTE_EOS_ID = 0


@dataclasses.dataclass(frozen=True)
class Vocab:
  vocab_size: int
  eos_id: int


@dataclasses.dataclass(frozen=True)
class Corpus:
  stream: TokenStream
  vocab: Vocab
  num_documents: int


def vocab_info(config: TextDataConfig) -> Vocab:
  """vocab_size and eos_id without loading any text (token sources read only meta.json)."""
  task = config.task()
  if task is not None:
    return Vocab(task.vocab_size, task.eos_id)
  if config.source == "tokens":
    meta = token_shards.read_meta(config.path)
    return Vocab(meta.vocab_size, meta.eos_id)
  return Vocab(BYTE_VOCAB_SIZE, BYTE_EOS_ID)


def _describe(config: TextDataConfig, split: str) -> str:
  return f"split={split!r} of source={config.source!r}" + (f" path={config.path!r}"
                                                            if config.path else "")


def _byte_stream(docs: list[documents.Document]) -> TokenStream:
  separator = bytes([BYTE_EOS_ID])
  data = b"".join(part for doc in docs for part in (doc.read(), separator))
  return TokenStream([np.frombuffer(data, np.uint8)])


def load_corpus(config: TextDataConfig, split: str) -> Corpus:
  documents.check_split(split)
  if config.task() is not None:
    raise ValueError(f"source={config.source!r} is a synthetic task with no corpus; "
                     "make_lm_iterator generates its batches")
  if config.source == "tokens":
    stream, meta = token_shards.load_token_stream(config.path, split)
    vocab = Vocab(meta.vocab_size, meta.eos_id)
    num_documents = int(meta.num_documents.get(split, 0))
  else:
    if config.source == "stdlib":
      docs = documents.stdlib_documents(split, config.validation_fraction, config.max_bytes,
                                        config.include_tests)
    else:
      docs = documents.file_documents(config.path, split, config.validation_fraction,
                                      config.max_bytes)
    if not docs:
      raise ValueError(f"{_describe(config, split)} has no documents (validation_fraction="
                       f"{config.validation_fraction}, max_bytes={config.max_bytes}); add files "
                       "or change validation_fraction")
    stream = _byte_stream(docs)
    vocab = Vocab(BYTE_VOCAB_SIZE, BYTE_EOS_ID)
    num_documents = len(docs)
  if len(stream) < 2:
    raise ValueError(f"{_describe(config, split)} holds {len(stream)} token(s); "
                     "needs at least 2 (an input and its target)")
  return Corpus(stream, vocab, num_documents)
