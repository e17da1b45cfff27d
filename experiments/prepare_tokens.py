r"""Tokenize local text into `.npy` token shards + meta.json for the "tokens" data source.

    python -m experiments.prepare_tokens --input='corpus/**/*.txt' --output_dir=/data/tok \
        --tokenizer=gpt2                      # any Hugging Face tokenizer name or local path
    python -m experiments.prepare_tokens --input=stdlib --output_dir=/tmp/stdlib_bytes \
        --tokenizer=bytes                     # byte ids 0..255, EOS 0; needs no extra package

Documents and their train/validation split are exactly those of the byte-level sources
(tnt_jax/data/documents.py): each matched file is a document, split by a stable hash of its path;
a single file is split by position; --input=stdlib takes the Python standard library. Each
document is followed by the EOS id. Train with
`TextDataConfig(source="tokens", path=<output_dir>)`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
import numpy as np

from tnt_jax.data import documents, token_shards

flags.DEFINE_string("input", None, "file, glob, comma-separated list of them, or 'stdlib'")
flags.DEFINE_string("output_dir", None, "where the shards and meta.json go (created)")
flags.DEFINE_string("tokenizer", None, "'bytes', or a Hugging Face tokenizer name or local path")
flags.DEFINE_float("validation_fraction", 0.02, "share of documents (or of one file) held out")
flags.DEFINE_integer("max_bytes", 0, "read at most this many bytes of input, whole files in "
                     "sorted order (0: no cap; stdlib's default cap is 16 MiB)")
flags.DEFINE_integer("eos_id", -1, "end-of-document id (-1: the tokenizer's eos_token_id)")
flags.DEFINE_integer("shard_tokens", 2**27, "start a new shard after this many tokens")
FLAGS = flags.FLAGS

_DOCS_PER_CALL = 64   # documents per tokenizer call: batched for speed, bounded for memory


def load_tokenizer(name: str, eos_id: int | None = None):
  """(encode: list[bytes] -> list of id arrays, vocab_size, eos_id)."""
  if name == "bytes":
    encode = lambda texts: [np.frombuffer(t, np.uint8) for t in texts]
    return encode, 256, 0 if eos_id is None else eos_id
  try:
    import transformers   # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"--tokenizer={name!r} needs Hugging Face transformers: "
                      "`pip install transformers` (or use --tokenizer=bytes)") from None
  tokenizer = transformers.AutoTokenizer.from_pretrained(name)
  tokenizer.model_max_length = sys.maxsize   # whole documents; rows are cut later
  if eos_id is None:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
      raise ValueError(f"tokenizer {name!r} has no eos_token_id; pass --eos_id")

  def encode(texts):
    strings = [t.decode("utf-8", errors="replace") for t in texts]
    return [np.asarray(ids) for ids in tokenizer(strings, add_special_tokens=False)["input_ids"]]

  return encode, len(tokenizer), eos_id


def split_documents(input_: str, split: str, validation_fraction: float, max_bytes: int | None):
  if input_ == "stdlib":
    return documents.stdlib_documents(split, validation_fraction, max_bytes)
  return documents.file_documents(input_, split, validation_fraction, max_bytes)


def prepare(input_: str, output_dir: str, tokenizer: str, validation_fraction: float = 0.02,
            max_bytes: int | None = None, eos_id: int | None = None,
            shard_tokens: int = 2**27) -> token_shards.TokenMeta:
  """Write both splits' shards, then meta.json (last, so a listed shard is always complete)."""
  documents.check_validation_fraction(validation_fraction)
  split_docs = {s: split_documents(input_, s, validation_fraction, max_bytes)
                for s in documents.SPLITS}
  encode, vocab_size, eos_id = load_tokenizer(tokenizer, eos_id)
  if not 0 <= eos_id < vocab_size:
    raise ValueError(f"{eos_id=} must be in [0, vocab_size={vocab_size})")
  os.makedirs(output_dir, exist_ok=True)
  stale = token_shards.meta_path(output_dir)
  if os.path.exists(stale):
    os.remove(stale)
  writers = {}
  for split, docs in split_docs.items():
    writer = token_shards.ShardWriter(output_dir, split, vocab_size, eos_id, shard_tokens)
    for start in range(0, len(docs), _DOCS_PER_CALL):
      for ids in encode([d.read() for d in docs[start:start + _DOCS_PER_CALL]]):
        writer.add(ids)
    writer.close()
    writers[split] = writer
  meta = token_shards.TokenMeta(
      vocab_size=vocab_size, eos_id=eos_id, tokenizer=tokenizer,
      shards={s: w.shards for s, w in writers.items()},
      num_tokens={s: w.num_tokens for s, w in writers.items()},
      num_documents={s: w.num_documents for s, w in writers.items()})
  token_shards.write_meta(output_dir, meta)
  return meta


def main(argv):
  del argv
  for name in ("input", "output_dir", "tokenizer"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  meta = prepare(FLAGS.input, FLAGS.output_dir, FLAGS.tokenizer, FLAGS.validation_fraction,
                 max_bytes=FLAGS.max_bytes or None,
                 eos_id=None if FLAGS.eos_id < 0 else FLAGS.eos_id,
                 shard_tokens=FLAGS.shard_tokens)
  for split in documents.SPLITS:
    print(f"{split}: {meta.num_documents[split]} documents, {meta.num_tokens[split]} tokens, "
          f"{len(meta.shards[split])} shard(s)")
  print(f"vocab_size={meta.vocab_size} eos_id={meta.eos_id} -> {FLAGS.output_dir}")


if __name__ == "__main__":
  app.run(main)
