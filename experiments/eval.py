r"""Held-out bits per byte (or per token), or memory-task accuracy, of trained models at several
context lengths.

    python -m experiments.eval --checkpoints tnt=/tmp/tnt/checkpoints,titans=/tmp/t/checkpoints \
        --lengths 256,1024,4096,16384 --out_dir /tmp/eval
    # needle in a haystack: accuracy per (length, depth), a heatmap per model
    python -m experiments.eval --task=needle --checkpoints tnt=/tmp/needle_tnt/checkpoints \
        --lengths 1024,4096,16384 --depths 0,0.25,0.5,0.75,1 --out_dir /tmp/eval_needle
    # MQAR: answer accuracy per length (the run's MQAR settings)
    python -m experiments.eval --task=mqar --checkpoints tnt=/tmp/mqar_tnt/checkpoints \
        --lengths 256,1024,4096

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
flags.DEFINE_enum("task", "text", ["text", "needle", "mqar"], "text: bits on held-out text; "
                  "needle / mqar: answer accuracy on the synthetic task (tnt_jax/data/tasks)")
flags.DEFINE_string("depths", "0,0.25,0.5,0.75,1", "needle depths")
flags.DEFINE_string("haystack", "", "needle haystack text file (default: the run's, else noise)")
flags.DEFINE_integer("task_rows", 32, "rows scored per (length[, depth]) cell of a task")
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
    train_length = config.data.seq_len
    decoders = {}   # one per length: each compiles once

    # Rows longer than a segment are scored segment by segment with the carried state (equal
    # to the parallel forward, tests/models/test_decoding.py), so any length fits in memory.
    def forward(x, model=model, decoders=decoders):
      if x.shape[1] not in decoders:
        decoders[x.shape[1]] = Decoder(model, max_length=x.shape[1], segment=FLAGS.segment)
      return decoders[x.shape[1]].forward(x)

    print(f"{name}: {path} (trained at length {train_length})")
    if FLAGS.task == "text":
      if FLAGS.data_path:
        base = dataclasses.replace(base, source="files", path=FLAGS.data_path)
      unit = "bits per byte" if vocab.vocab_size == data.BYTE_VOCAB_SIZE else "bits per token"

      def batches(length, base=base):
        rows = -(-FLAGS.tokens // length)
        cfg = dataclasses.replace(base, seq_len=length, batch_size=min(FLAGS.batch_size, rows))
        return data.make_lm_iterator(cfg, "validation", max_batches=-(-rows // cfg.batch_size))

      results[name] = length_sweep(forward, batches, lengths, unit=unit)
    else:
      results[name] = task_scores(name, forward, base, vocab, lengths)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  with open(os.path.join(FLAGS.out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  if FLAGS.task == "needle":
    return
  key, fmt = (("bits_per_token", "{:.4f}") if FLAGS.task == "text" else ("accuracy", "{:.3f}"))
  title = f"{unit} at each context length" if FLAGS.task == "text" else "MQAR answer accuracy"
  header = "| model | " + " | ".join(str(n) for n in lengths) + " |"
  table = [title, "", header, "|---" * (len(lengths) + 1) + "|"]
  for name, rows in results.items():
    table.append(f"| {name} | " + " | ".join(fmt.format(r[key]) for r in rows) + " |")
  with open(os.path.join(FLAGS.out_dir, "table.md"), "w") as f:
    f.write("\n".join(table) + "\n")
  if FLAGS.task == "text":
    plot_length_sweep(results, os.path.join(FLAGS.out_dir, "length.png"),
                      train_length=train_length, unit=unit)
  print("\n".join(table))
  print(f"wrote {FLAGS.out_dir}/results.json, table.md" +
        (", length.png" if FLAGS.task == "text" else ""))


def task_scores(name, forward, base, vocab, lengths):
  """Needle: accuracy grid [length, depth] + heatmap; MQAR: accuracy per length."""
  from tnt_jax.data import tasks
  batch_size = min(FLAGS.batch_size, FLAGS.task_rows)
  num_batches = -(-FLAGS.task_rows // batch_size)
  if FLAGS.task == "needle":
    if vocab.vocab_size != 256:
      raise ValueError(f"the needle task is byte level; model {name} has vocab "
                       f"{vocab.vocab_size}")
    depths = [float(d) for d in FLAGS.depths.split(",")]
    run_task = base.task() if base.source == "needle" else None
    haystack = FLAGS.haystack or (run_task.haystack if run_task else "")
    digits = ({} if run_task is None else
              dict(key_digits=run_task.key_digits, value_digits=run_task.value_digits))
    grid = tasks.accuracy_grid(forward, lengths, depths, batch_size=batch_size,
                               num_batches=num_batches, seed=20261122, haystack=haystack,
                               **digits)
    png = tasks.plot_heatmap(grid, lengths, depths,
                             os.path.join(FLAGS.out_dir, f"needle_{name}.png"),
                             title=f"needle accuracy: {name}")
    for length, row in zip(lengths, grid):
      print(f"length {length:>6}: " + "  ".join(f"{100 * a:5.1f}%" for a in row))
    print(f"wrote {png}")
    return {"lengths": lengths, "depths": depths, "accuracy": grid.tolist()}
  task = base.task() if base.source == "mqar" else tasks.MQAR()
  if task.vocab_size > vocab.vocab_size:
    raise ValueError(f"MQAR vocab {task.vocab_size} exceeds model {name}'s {vocab.vocab_size}")
  rows = []
  for length in lengths:
    correct = total = 0
    for b in range(num_batches):
      batch = task.batch((20261122, b), length, batch_size)
      c, t = tasks.answer_accuracy(forward(batch["inputs"]), batch)
      correct, total = correct + c, total + t
    rows.append({"length": length, "accuracy": correct / total, "answers": total})
    print(f"length {length:>6}: accuracy {correct / total:.3f} over {total} answers")
  return rows


if __name__ == "__main__":
  app.run(main)
