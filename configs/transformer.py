r"""Attention baselines: a Transformer with full causal attention or sliding-window attention
in every block (RoPE, gated output, SwiGLU MLPs), on the same trainer as the memory models.

    python -m experiments.train --config configs/transformer.py:size=tiny --workdir /tmp/attn

Argument string (comma-separated key=value; all optional):
  size     tiny (CPU, minutes; the default) | small | paper150m, as in configs/tnt_lm.py
  variant  attention (default: full causal attention) | swa (sliding window)
  window   the sliding window in tokens (default: min(512, seq_len))
  data     as in configs/tnt_lm.py (stdlib | a text file or glob | tokens:<dir>)

On a GPU with bf16 the attention runs cuDNN's fused kernel (jax.nn.dot_product_attention).
Persistent memory tokens (learned keys every query sees, Titans §3.3):
--config.model.mixer_options.swa.persistent_tokens=16 (or .attention.).
"""

from configs import tnt_lm

ARGS = ("size", "variant", "window", "data")
VARIANTS = ("attention", "swa")


def get_config(arg: str = ""):
  args = tnt_lm.parse_args(arg, ARGS)
  variant = args.get("variant", "attention")
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} is unknown; expected one of {VARIANTS}")
  if "window" in args and variant != "swa":
    raise ValueError("window= sets the sliding window; it needs variant=swa")
  base = ",".join(f"{k}={args[k]}" for k in ("size", "data") if k in args)
  c = tnt_lm.get_config(",".join(filter(None, [base, f"mixer={variant}"])))
  if "window" in args:
    c.model.window = int(args["window"])
  c.model.mixer_options = {}
  return c
