r"""Train every architecture on the same data for the same tokens, one process each, and put
final eval loss, tokens/s, parameters and peak GPU memory into one table and one plot.

    python -m experiments.compare_architectures --data=war_and_peace.txt --size=small \
        --steps=150 --seq_len=1024 --results_dir=docs/results/architectures/

Each run is `experiments.train` with a family's config file (ARCHITECTURES below), the same
size, data, sequence length, batch, steps and optimiser, in a fresh process (so each peak
memory is that run's own), under a --run_timeout. Rows go to <results_dir>/architectures.jsonl as runs
finish; --table_only remakes architectures.md and architectures.png from that file.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

# name -> config file and its arguments; --size and --data are appended to each.
ARCHITECTURES = {
    "attention": "configs/transformer.py:variant=attention",
    "swa": "configs/transformer.py:variant=swa",
    "titans": "configs/titans.py:variant=lmm",
    "tnt": "configs/tnt_lm.py:mixer=tnt",
    "mac_titans": "configs/titans.py:variant=mac",
    "mag_titans": "configs/titans.py:variant=mag",
    "mal_titans": "configs/titans.py:variant=mal",
    "mag_tnt": "configs/titans.py:variant=mag,memory=tnt",
    "lact_hybrid": "configs/lact.py:variant=hybrid",
    "ttt_e2e": "configs/ttt_e2e.py:",
}

flags.DEFINE_list("archs", list(ARCHITECTURES), f"which of {tuple(ARCHITECTURES)}")
flags.DEFINE_string("size", "small", "the configs' size argument")
flags.DEFINE_string("data", "stdlib", "the configs' data argument (a text file for real text)")
flags.DEFINE_integer("steps", 150, "training steps of every run")
flags.DEFINE_integer("seq_len", 0, "tokens per sequence (0: the size's)")
flags.DEFINE_integer("batch_size", 0, "sequences per step (0: the size's)")
flags.DEFINE_integer("eval_batches", 8, "held-out batches of the final evaluation")
flags.DEFINE_list("overrides", [], "extra --config.X=Y flags for every run, without --config.")
flags.DEFINE_string("results_dir", "/tmp/architectures",
                    "folder of the rows, logs, table and plot")
flags.DEFINE_string("workdirs", "", "folder of the runs' workdirs (default: <results_dir>/runs)")
flags.DEFINE_integer("run_timeout", 900, "seconds before a run is stopped and recorded so")
flags.DEFINE_string("png", "", "where the plot goes (default: <results_dir>/architectures.png)")
flags.DEFINE_bool("table_only", False, "remake the table and plot from <results_dir>/architectures.jsonl")
flags.DEFINE_string("result", "", "internal: a child run writes its row here")
flags.DEFINE_string("child_config", "", "internal: the child's config spec")
FLAGS = flags.FLAGS


def config_spec(name: str) -> str:
  path, _, args = ARCHITECTURES[name].partition(":")
  args = ",".join(filter(None, [args, f"size={FLAGS.size}", f"data={FLAGS.data}"]))
  return f"{path}:{args}"


def config_overrides() -> list[str]:
  overrides = [f"steps={FLAGS.steps}", f"eval_every={FLAGS.steps}",
               f"checkpoint_every={FLAGS.steps}", f"eval_batches={FLAGS.eval_batches}",
               f"log_every={max(1, FLAGS.steps // 15)}"]
  if FLAGS.seq_len:
    overrides.append(f"data.seq_len={FLAGS.seq_len}")
  if FLAGS.batch_size:
    overrides.append(f"data.batch_size={FLAGS.batch_size}")
  return overrides + list(FLAGS.overrides)


def run_child():
  """In the child process: load the config as experiments.train does, train, write the row."""
  import jax
  from ml_collections import config_flags
  from tnt_jax.train import trainer
  from tnt_jax.train.metrics import load_history
  from tnt_jax.models import LanguageModel
  from tnt_jax.layers.memory_layer import count_params
  from flax import nnx

  # config_flags parses the file and the --config.X overrides from argv, like experiments.train
  config = config_flags.DEFINE_config_file("config", FLAGS.child_config, lock_config=True)
  FLAGS(sys.argv, known_only=True)
  config = config.value
  workdir = os.path.join(FLAGS.workdirs or os.path.join(FLAGS.results_dir, "runs"),
                         os.path.basename(FLAGS.result)[:-len(".json")])
  start = time.perf_counter()
  summary = trainer.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  history = load_history(os.path.join(workdir, "logs", "metrics.jsonl"))
  rates = [v for _, v in history.get("tokens_per_s", [])[1:]]   # the first holds the compile
  vocab = trainer.data.vocab_info(trainer.data_config(config)).vocab_size
  model_config = trainer.lm_config(config, vocab)
  params = count_params(nnx.eval_shape(lambda: LanguageModel(model_config, rngs=nnx.Rngs(0))))
  stats = jax.local_devices()[0].memory_stats() or {}
  row = dict(pattern=",".join(model_config.pattern), params=params, steps=summary["step"],
             tokens=summary["step"] * config.data.batch_size * config.data.seq_len,
             eval_loss=summary["eval_loss"], eval_bits=summary["eval_bits_per_token"],
             tokens_per_s=sorted(rates)[len(rates) // 2] if rates else None, wall_s=wall,
             peak_memory_gb=stats["peak_bytes_in_use"] / 1e9 if stats else None,
             device=jax.devices()[0].device_kind,
             train_loss=history.get("train_loss", []))   # the curve travels with the row
  with open(FLAGS.result, "w") as f:
    json.dump(row, f)


def run_all():
  os.makedirs(FLAGS.results_dir, exist_ok=True)
  rows_path = os.path.join(FLAGS.results_dir, "architectures.jsonl")
  for name in FLAGS.archs:
    if name not in ARCHITECTURES:
      raise app.UsageError(f"--archs: {name!r} is unknown; expected {tuple(ARCHITECTURES)}")
  for name in FLAGS.archs:
    result = os.path.join(FLAGS.results_dir, f"{name}.json")
    command = [sys.executable, "-m", "experiments.compare_architectures",
               f"--child_config={config_spec(name)}", f"--result={result}",
               f"--results_dir={FLAGS.results_dir}", f"--workdirs={FLAGS.workdirs}"]
    command += [f"--config.{o}" for o in config_overrides()]
    print(f"== {name}: {config_spec(name)}", flush=True)
    row = dict(name=name, config=config_spec(name), overrides=config_overrides())
    start = time.perf_counter()
    try:
      done = subprocess.run(command, timeout=FLAGS.run_timeout, capture_output=True, text=True)
      log = done.stdout + done.stderr
      if done.returncode == 0:
        with open(result) as f:
          row.update(json.load(f))
      else:
        row["error"] = log.strip().splitlines()[-1][:300] if log.strip() else "failed"
    except subprocess.TimeoutExpired as e:
      log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      row["error"] = f"stopped after --run_timeout={FLAGS.run_timeout} s"
    with open(os.path.join(FLAGS.results_dir, f"{name}.log"), "w") as f:
      f.write(log)
    row["process_s"] = time.perf_counter() - start
    print(format_row(row), flush=True)
    with open(rows_path, "a") as f:
      f.write(json.dumps(row) + "\n")
  write_table_and_plot(rows_path)


def format_row(r) -> str:
  if "error" in r:
    return f"{r['name']:>12}: FAILED {r['error']}"
  memory = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f} GB"
  return (f"{r['name']:>12}: {r['params'] / 1e6:6.1f}M params  eval loss {r['eval_loss']:.4f} "
          f"({r['eval_bits']:.3f} bits)  {r['tokens_per_s'] / 1e3:8.1f}K tok/s  peak {memory}  "
          f"wall {r['wall_s']:.0f} s")


def load_rows(rows_path):
  rows = {}
  with open(rows_path) as f:
    for line in f:
      row = json.loads(line)
      rows[row["name"]] = row   # a rerun of one architecture replaces its row
  return list(rows.values())


def write_table_and_plot(rows_path, png=""):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  rows = load_rows(rows_path)
  done = [r for r in rows if "error" not in r]
  lines = ["| architecture | pattern | params | tokens | eval loss (nats) | bits | tokens/s | "
           "peak memory | wall |", "|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(done, key=lambda r: r["eval_loss"]):
    memory = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f} GB"
    lines.append(f"| {r['name']} | `{r['pattern']}` | {r['params'] / 1e6:.1f}M | "
                 f"{r['tokens'] / 1e6:.2f}M | {r['eval_loss']:.4f} | {r['eval_bits']:.3f} | "
                 f"{r['tokens_per_s'] / 1e3:.1f}K | {memory} | {r['wall_s']:.0f} s |")
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | |")
  table = os.path.join(os.path.dirname(rows_path), "architectures.md")
  with open(table, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  fig = Figure(figsize=(13, 4.8))
  FigureCanvasAgg(fig)
  curves, speed = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  colors = {}
  for r in sorted(done, key=lambda r: r["eval_loss"]):
    train = r["train_loss"]
    if train:
      per_step = r["tokens"] / r["steps"]
      line, = curves.plot([s * per_step / 1e6 for s, _ in train], [v for _, v in train],
                          label=f"{r['name']} ({r['eval_loss']:.3f})")
      colors[r["name"]] = line.get_color()
  finals = [v for r in done for _, v in r["train_loss"][-1:]]
  if finals:   # the first steps' losses would flatten the part where the runs differ
    curves.set_ylim(0.95 * min(finals), 1.8 * max(finals))
  curves.set(xlabel="training tokens (M)", ylabel="train loss (nats/token)",
             title="loss (legend: final eval loss)")
  curves.legend(fontsize=8)
  curves.grid(alpha=0.3)
  for r in done:
    speed.scatter(r["tokens_per_s"] / 1e3, r["eval_loss"], color=colors.get(r["name"]))
    speed.annotate(r["name"], (r["tokens_per_s"] / 1e3, r["eval_loss"]), fontsize=8,
                   xytext=(3, 3), textcoords="offset points")
  speed.set(xscale="log", xlabel="training tokens/s (K, log)", ylabel="final eval loss (nats)",
            title=f"speed and quality, {done[0]['device'] if done else ''}")
  speed.grid(alpha=0.3)
  fig.tight_layout()
  png = png or os.path.join(os.path.dirname(rows_path), "architectures.png")
  fig.savefig(png, dpi=120)
  print("wrote", table, "and", png)


def main(argv):
  del argv
  if FLAGS.result:
    run_child()
  elif FLAGS.table_only:
    write_table_and_plot(os.path.join(FLAGS.results_dir, "architectures.jsonl"), FLAGS.png)
  else:
    run_all()


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
