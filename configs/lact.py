r"""LaCT (large-chunk test-time training, SPEC §1.4) language models: the hybrid block of
sliding-window attention sharing q, k, v with a SwiGLU fast-weight memory, or the memory alone.

    python -m experiments.train --config configs/lact.py:size=tiny --workdir /tmp/lact

Argument string (comma-separated key=value; all optional):
  size     tiny (CPU, minutes; the default) | small | paper150m, as in configs/tnt_lm.py
  variant  hybrid (default: the memory + sliding-window attention over the same q, k, v, the
           two outputs summed) | memory (the memory layer alone)
  chunk    tokens per memory update (default: the size's global chunk: 64 / 256 / 2048)
  window   the hybrid's attention window (default: the chunk, as in LaCT)
  data     as in configs/tnt_lm.py (stdlib | a text file or glob | tokens:<dir>)

The memory is read at chunk start and updated once per chunk by the dot-product loss with Muon
and row-norm restoring L2 normalisation (tnt_jax/layers/configs.py LaCTLayerConfig); any of its
fields can be overridden, e.g. --config.model.mixer_options.lact_hybrid.momentum=True.
Everything else (optimiser, mesh, schedule) is configs/tnt_lm.py's.
"""

from configs import tnt_lm

ARGS = ("size", "variant", "chunk", "window", "data")
VARIANTS = {"hybrid": "lact_hybrid", "memory": "lact"}


def get_config(arg: str = ""):
  args = tnt_lm.parse_args(arg, ARGS)
  variant = args.get("variant", "hybrid")
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} is unknown; expected one of {tuple(VARIANTS)}")
  kind = VARIANTS[variant]
  size = args.get("size", "tiny")
  base = ",".join(f"{k}={args[k]}" for k in ("size", "data") if k in args)
  c = tnt_lm.get_config(",".join(filter(None, [base, f"mixer={kind}"])))
  chunk = int(args.get("chunk", tnt_lm.SIZES[size]["global_chunk"]))
  options = dict(chunk_size=chunk, chunk_lr_budget=0.25, global_handoff="chain",
                 implementation="xla")   # pallas: the fused kernel (falls back for lact)
  if kind == "lact_hybrid":
    options["shared_window"] = int(args.get("window", chunk))
  elif "window" in args:
    raise ValueError("window= sets the hybrid's attention window; variant=memory has none")
  c.model.mixer_options = {kind: options}
  return c
