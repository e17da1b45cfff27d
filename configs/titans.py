r"""Titans: LMM, MAC, MAG or MAL, each with a Titans or a TNT memory (SPEC §3).

    python -m experiments.train --config configs/titans.py:size=tiny,variant=mac --workdir /tmp/mac

Argument string (comma-separated key=value; all optional):
  size        tiny (CPU, minutes; the default) | small | paper150m: configs/tnt_lm.py's sizes
  variant     mac (default): memory as context, per segment of `window` tokens (retrieve from
              the memory, attend over [persistent | retrieved | segment], update the memory with
              the attention output; tnt_jax/layers/mac.py)
              | mag: memory as a gate beside sliding-window attention
              | mal: memory layer, then sliding-window attention
              | lmm: the memory layers alone
  memory      titans (default): one deep memory with momentum and forgetting, chunk `chunk`
              | tnt: TNT's global + local memories (TNT-Titans)
  chunk       titans: the chunk size; tnt: the local chunk (as in configs/tnt_lm.py)
  local_chunks  tnt: local chunk sizes joined by "+"
  persistent  persistent memory tokens every attention query sees (default 4; lmm: 0, it has
              no attention). They are the "swa" kind's option, so every attention has them.
  window      sliding-window size = MAC's segment length (default min(512, seq_len)). MAC's
              memory updates start every segment, so the window must be a multiple of the
              memory's chunks and shards: with variant=mac,memory=tnt, TNT's global chunk and
              shard length are capped at the window.
  data        as in configs/tnt_lm.py (stdlib, a text file path or glob, tokens:<dir>)

Examples:
    # TNT-Titans MAG on the embedded corpus
    python -m experiments.train --config configs/titans.py:variant=mag,memory=tnt \
        --workdir /tmp/mag_tnt
    # Titans MAC at chunk 16, 8 persistent tokens, on a GPU
    python -m experiments.train --workdir /tmp/mac16 \
        --config configs/titans.py:size=small,variant=mac,chunk=16,persistent=8
Everything else (optimiser, mesh, steps) is configs/tnt_lm.py's; override fields as usual
(--config.steps=100 --config.model.window=256 ...). MAC has no context-parallel form
(mesh.context must stay 1).
"""

from ml_collections import config_dict

from configs import tnt_lm

ARGS = ("size", "variant", "memory", "chunk", "local_chunks", "persistent", "window", "data")
VARIANTS = ("mac", "mag", "mal", "lmm")
MEMORIES = ("titans", "tnt")


def get_config(arg: str = "") -> config_dict.ConfigDict:
  args = tnt_lm.parse_args(arg, ARGS)
  variant, memory = args.pop("variant", "mac"), args.pop("memory", "titans")
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
  if memory not in MEMORIES:
    raise ValueError(f"memory={memory!r} must be one of {MEMORIES}")
  persistent = int(args.pop("persistent", "0" if variant == "lmm" else "4"))
  if variant == "lmm" and persistent:
    raise ValueError(f"persistent={persistent}: variant=lmm has no attention to give persistent "
                     "tokens to; use variant=mac, mag or mal")
  window = args.pop("window", None)
  mixer = memory if variant == "lmm" else f"{variant}:{memory}"
  c = tnt_lm.get_config(",".join(f"{k}={v}" for k, v in dict(args, mixer=mixer).items()))
  if window is not None:
    c.model.window = int(window)
  if persistent:
    c.model.mixer_options["swa"] = {"persistent_tokens": persistent}
  if variant == "mac" and memory == "tnt":
    tnt = c.model.mixer_options["tnt"]
    tnt["global_chunk"] = min(tnt["global_chunk"], c.model.window)
    tnt["shard_lengths"] = min(tnt["shard_lengths"], c.model.window)
  return c
