r"""Train a language model: `python -m experiments.train` (the tiny TNT LM on the embedded corpus).

    python -m experiments.train --config configs/tnt_lm.py:size=small,mixer=titans,chunk=64 \
        --workdir /tmp/run --config.optim.lr=1e-3

The logic lives in tnt_jax/train/trainer.py; this file only parses flags. Rerunning a command
with the same --workdir resumes from its latest complete checkpoint.
"""

import os

from absl import app, flags
import jax
from ml_collections import config_flags

from tnt_jax.train import determinism

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "tnt_lm.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "experiment config file[:args]",
                                lock_config=True)
flags.DEFINE_string("workdir", "/tmp/tnt_jax_run", "checkpoints, logs and loss.png go here")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host GPU "
                  "clusters and TPU pods: run the same command on every host)")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config.get("deterministic", False):
    determinism.set_xla_flags()   # before anything starts the backend
  if FLAGS.distributed:
    jax.distributed.initialize()
  from tnt_jax.train.trainer import train_and_evaluate   # after distributed init
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
