r"""TTT-E2E: a sliding-window-attention Transformer whose last quarter of blocks has mutable
MLPs, stepped by clipped SGD on each mini-batch's next-token loss, trained end to end through
those steps (SPEC §3; tnt_jax/models/ttt_e2e.py).

    python -m experiments.train --config configs/ttt_e2e.py:size=tiny --workdir /tmp/e2e

Argument string (comma-separated key=value; all optional):
  size        tiny (CPU, minutes; the default) | small (one GPU) | paper150m: the shapes, data and
              optimiser of configs/tnt_lm.py's sizes, with SWA in every block
  mini_batch  tokens per inner step (default 32 | 256 | 1024 by size)
  window      the attention window (default 32 | 512 | 2048 by size); keep it >= mini_batch, so
              a token leaves the window only after its mini-batch's step has taken it in
  inner_lr    the inner SGD step size (default 1.0; the step is clipped to norm 1 per row).
              Measured on size=tiny, 150 steps (--config.steps=150, CPU): eval loss 2.311 with
              1.0 against 2.434 with 0.0 (the same model, its inner loop switched off)
  data        as in configs/tnt_lm.py: stdlib | a text file path or glob | tokens:<dir>

Examples:
    python -m experiments.train --config configs/ttt_e2e.py:size=tiny --workdir /tmp/e2e
    python -m experiments.generate --checkpoint /tmp/e2e/checkpoints --prompt "def main("
    python -m experiments.train --config configs/ttt_e2e.py:size=small,data=tokens:/data/c4 \
        --workdir /tmp/e2e_small
Any field can then be overridden: --config.model.ttt_e2e.clip_norm=0.5
--config.model.ttt_e2e.remat=False --config.optim.lr=1e-3 ...
"""

from ml_collections import config_dict

from configs import tnt_lm
from tnt_jax.models.ttt_e2e import TTTE2EConfig

# Per size of configs/tnt_lm.py (seq_len 128 | 2048 | 16384): a multiple of mini_batch.
TTT_SIZES = {
    "tiny": dict(mini_batch=32, window=32),
    "small": dict(mini_batch=256, window=512),
    "paper150m": dict(mini_batch=1024, window=2048),
}
ARGS = ("size", "mini_batch", "window", "inner_lr", "data")


def get_config(arg: str = "") -> config_dict.ConfigDict:
  args = tnt_lm.parse_args(arg, ARGS)
  size = args.get("size", "tiny")
  base = {"size": size, "mixer": "swa"} | ({"data": args["data"]} if "data" in args else {})
  c = tnt_lm.get_config(",".join(f"{k}={v}" for k, v in base.items()))   # checks the size
  defaults = TTT_SIZES[size]
  c.model.window = int(args.get("window", defaults["window"]))
  c.model.remat = False     # TTT-E2E checkpoints each mini-batch step instead (ttt_e2e.remat)
  c.model.ttt_e2e = config_dict.ConfigDict(dict(
      mini_batch=int(args.get("mini_batch", defaults["mini_batch"])),
      inner_lr=float(args.get("inner_lr", 1.0)),
      clip_norm=1.0,             # the inner gradient's norm over all mutable weights, per row
      mutable_fraction=0.25,     # the last quarter of the blocks
      remat=True))
  TTTE2EConfig.from_value(c.model.ttt_e2e.to_dict())   # bad values raise here, before a run
  return c
