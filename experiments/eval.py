r"""Held-out bits per byte (or per token) of trained models at several context lengths.

    python -m experiments.eval --checkpoints tnt=/tmp/tnt/checkpoints,titans=/tmp/t/checkpoints \
        --lengths 256,1024,4096,16384 --out_dir /tmp/eval

Each model is scored on its run's validation split (or --data_path), cut into rows of each
length; the same first --tokens tokens are scored at every length, so a longer context is the
only difference (lengths above the training length test extrapolation). Writes results.json, table.md and length.png to
--out_dir and prints the table.
"""

import json
import os

from absl import app, flags

flags.DEFINE_string("checkpoints", None, "name=path[,name=path...]: checkpoint directories",
                    required=True)
flags.DEFINE_string("lengths", "256,1024,4096", "comma-separated context lengths")
flags.DEFINE_integer("batch_size", 4, "rows per batch (at most)")
flags.DEFINE_integer("tokens", 65536, "tokens scored at each length: the same first tokens of "
                     "the split at every length, so lengths compare on one text")
flags.DEFINE_string("data_path", "", "score this text file instead of the run's validation "
                    "split (byte-level models)")
flags.DEFINE_string("dtype", None, "compute dtype override (default: the run's)")
flags.DEFINE_integer("segment", 2048, "tokens per forward segment (memory is bounded by it)")
flags.DEFINE_string("out_dir", "/tmp/tnt_jax_eval", "results.json, table.md and length.png")
FLAGS = flags.FLAGS


def parse_named(spec: str) -> dict[str, str]:
  out = {}
  for item in filter(None, spec.split(",")):
    name, sep, path = item.partition("=")
    if not sep:
      name, path = os.path.basename(os.path.dirname(item.rstrip("/"))) or item, item
    out[name] = path
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import dataclasses
  from tnt_jax import data
  from tnt_jax.models.decoding import Decoder
  from tnt_jax.eval import length_sweep, plot_length_sweep
  from tnt_jax.train.restore_model import load_trained_model
  from tnt_jax.train.trainer import data_config

  lengths = [int(x) for x in FLAGS.lengths.split(",")]
  if any(n < 1 for n in lengths):
    raise ValueError(f"--lengths {lengths} must all be >= 1")
  results, train_length, unit = {}, None, "bits per token"
  for name, path in parse_named(FLAGS.checkpoints).items():
    model, config, vocab = load_trained_model(path, dtype=FLAGS.dtype)
    base = data_config(config)
    if FLAGS.data_path:
      base = dataclasses.replace(base, source="files", path=FLAGS.data_path)
    unit = "bits per byte" if vocab.vocab_size == data.BYTE_VOCAB_SIZE else "bits per token"
    train_length = config.data.seq_len

    def batches(length, base=base):
      rows = -(-FLAGS.tokens // length)
      cfg = dataclasses.replace(base, seq_len=length, batch_size=min(FLAGS.batch_size, rows))
      return data.make_lm_iterator(cfg, "validation", max_batches=-(-rows // cfg.batch_size))

    print(f"{name}: {path} (trained at length {train_length})")
    # Rows longer than a segment are scored segment by segment with the carried state (equal
    # to the parallel forward, tests/models/test_decoding.py), so any length fits in memory.
    decoders = {}   # one per length: each compiles once

    def forward(x, model=model):
      if x.shape[1] not in decoders:
        decoders[x.shape[1]] = Decoder(model, max_length=x.shape[1], segment=FLAGS.segment)
      return decoders[x.shape[1]].forward(x)

    results[name] = length_sweep(forward, batches, lengths, unit=unit)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  with open(os.path.join(FLAGS.out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  header = "| model | " + " | ".join(str(n) for n in lengths) + " |"
  table = [f"{unit} at each context length", "", header,
           "|---" * (len(lengths) + 1) + "|"]
  for name, rows in results.items():
    table.append(f"| {name} | " + " | ".join(f"{r['bits_per_token']:.4f}" for r in rows) + " |")
  with open(os.path.join(FLAGS.out_dir, "table.md"), "w") as f:
    f.write("\n".join(table) + "\n")
  plot_length_sweep(results, os.path.join(FLAGS.out_dir, "length.png"),
                    train_length=train_length, unit=unit)
  print("\n".join(table))
  print(f"wrote {FLAGS.out_dir}/results.json, table.md, length.png")


if __name__ == "__main__":
  app.run(main)
