r"""python -m experiments.train --config configs/tasks_lm.py:task=mqar,mixer=tnt --workdir /tmp/mqar_tnt

Train a small LM on a synthetic memory task (tnt_jax/data/tasks/, docs/tasks.md): multi-query
associative recall (MQAR) or needle in a haystack, scored on the answer tokens only, to compare
token mixers on what they remember. The model, optimiser and mesh are configs/tnt_lm.py's;
this file changes only the data, the length and the step budget. The MQAR defaults (length
128, 4 pairs, 600 steps) train the tiny models in 1-5 minutes on 2 CPU cores to well above
chance; docs/tasks.md has the accuracies measured.

Argument string (comma-separated key=value; all optional):
  task      mqar (default) | needle
  mixer, size, chunk, local_chunks   as in configs/tnt_lm.py (tnt | titans | swa | attention |
            ... or a "+" pattern; tiny is the default size)
  length    sequence length (default: 128 for mqar, 512 for needle)
  window    sliding-window size of swa blocks (default 32, well under most recall distances)
  pairs, vocab, alpha, filler     MQAR: key-value pairs per row (default 4), vocabulary (64),
            query-gap power law (0.01, as in Zoology), filler "pad" (default: the pairs and
            queries are the only non-pad tokens) | "noise" (Zoology's; harder)
  depth, haystack, key_digits, value_digits   needle: depth in [0, 1] (default: uniform per
            row), haystack text file or glob (default: random printable bytes), digits (4, 4)

Examples (compare TNT, Titans and sliding-window attention on the same task):
    python -m experiments.train --config configs/tasks_lm.py:task=mqar,mixer=titans,chunk=8 \
        --workdir /tmp/mqar_titans
    python -m experiments.train --config configs/tasks_lm.py:task=mqar,mixer=swa,window=32 \
        --workdir /tmp/mqar_swa
    python -m experiments.train --workdir /tmp/needle_tnt --config configs/tasks_lm.py:\
task=needle,mixer=tnt,length=1024,haystack=/work/shared/data/war_and_peace.txt
The eval loss is nats per answer token; any field can be overridden as usual
(--config.steps=100 --config.data.mqar_pairs=16 ...).
"""

from ml_collections import config_dict

from configs import tnt_lm

_BASE_ARGS = ("size", "mixer", "chunk", "local_chunks")
_TASK_ARGS = ("task", "length", "window", "pairs", "vocab", "alpha", "filler", "depth",
              "haystack", "key_digits", "value_digits")
TASKS = ("mqar", "needle")
DEFAULT_LENGTH = {"mqar": 128, "needle": 512}


def get_config(arg: str = "") -> config_dict.ConfigDict:
  args = tnt_lm.parse_args(arg, _BASE_ARGS + _TASK_ARGS)
  task = args.get("task", "mqar")
  if task not in TASKS:
    raise ValueError(f"task={task!r} must be one of {TASKS}")
  c = tnt_lm.get_config(",".join(f"{k}={args[k]}" for k in _BASE_ARGS if k in args))
  length = int(args.get("length", DEFAULT_LENGTH[task]))

  d = c.data
  d.source = task
  d.path = args.get("haystack", "") if task == "needle" else ""
  d.seq_len = length
  d.mqar_vocab_size = int(args.get("vocab", 64))
  d.mqar_pairs = int(args.get("pairs", 4))
  d.mqar_alpha = float(args.get("alpha", 0.01))
  d.mqar_filler = args.get("filler", "pad")
  d.needle_depth = (float(args["depth"]) if "depth" in args
                    else config_dict.placeholder(float))
  d.needle_key_digits = int(args.get("key_digits", 4))
  d.needle_value_digits = int(args.get("value_digits", 4))
  d.task_validation_batches = 16

  c.model.window = min(int(args.get("window", 32)), length)
  c.steps = 600
  c.optim.warmup_steps = 30
  c.log_every = 25
  c.eval_every = c.checkpoint_every = 200
  c.eval_batches = 8
  return c
