r"""Overlay the loss curves of several training runs (their logs/metrics.jsonl) in one PNG.

    python -m experiments.compare_runs --runs=tnt=/tmp/tnt,titans_c8=/tmp/titans_c8 \
        --tokens_per_step=32768 --out=docs/train_comparison.png

Left: loss against step; right: against training time, estimated from each log interval's
tokens/s and starting at the first logged step (whose interval holds the compilation), so
compilation and eval are excluded. The TNT paper compares speed this way (loss vs hours).
"""

import os

from absl import app, flags

from tnt_jax.train.metrics import load_history

flags.DEFINE_list("runs", [], "name=workdir (or name=path/to/metrics.jsonl) pairs")
flags.DEFINE_integer("tokens_per_step", 0, "batch x seq_len, for the time axis (0: step only)")
flags.DEFINE_string("out", "train_comparison.png", "output PNG")
flags.DEFINE_string("title", "", "figure title")
FLAGS = flags.FLAGS


def metrics_path(path: str) -> str:
  if path.endswith(".jsonl"):
    return path
  for candidate in (os.path.join(path, "logs", "metrics.jsonl"), os.path.join(path,
                                                                               "metrics.jsonl")):
    if os.path.exists(candidate):
      return candidate
  raise ValueError(f"no metrics.jsonl under {path!r} (looked in logs/ and the folder itself)")


def training_seconds(history, tokens_per_step: int) -> dict[int, float]:
  """Seconds since the first logged step, from the logged tokens/s of each later interval."""
  rates = history.get("tokens_per_s", [])
  if not rates:
    return {}
  seconds, elapsed, previous = {rates[0][0]: 0.0}, 0.0, rates[0][0]
  for step, rate in rates[1:]:
    elapsed += (step - previous) * tokens_per_step / rate
    seconds[step], previous = elapsed, step
  return seconds


def main(argv):
  del argv
  if not FLAGS.runs:
    raise app.UsageError("--runs is empty")
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = 2 if FLAGS.tokens_per_step else 1
  fig = Figure(figsize=(6.5 * panels, 4.5))
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
  for item in FLAGS.runs:
    name, sep, path = item.partition("=")
    if not sep:
      raise app.UsageError(f"run {item!r} must be name=path")
    history = load_history(metrics_path(path))
    train = history.get("train_loss", [])
    if not train:
      print(f"{name}: no train_loss logged, skipped")
      continue
    line, = axes[0].plot(*zip(*train), label=name)
    evals = history.get("eval_loss", [])
    if evals:
      axes[0].plot(*zip(*evals), "o", color=line.get_color())
    if panels == 2:
      seconds = training_seconds(history, FLAGS.tokens_per_step)
      axes[1].plot([seconds[s] for s, _ in train if s in seconds],
                   [v for s, v in train if s in seconds], label=name)
  axes[0].set(xlabel="step", ylabel="loss (nats/token; dots: eval)")
  if panels == 2:
    axes[1].set(xlabel="training seconds (from logged tokens/s)", ylabel="train loss")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  if FLAGS.title:
    fig.suptitle(FLAGS.title)
  fig.tight_layout()
  fig.savefig(FLAGS.out, dpi=120)
  print("wrote", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
