r"""Decoder LMs with TNT, Titans, TTT, LaCT or attention token mixers, stages 1 and 2 of TNT.

    python -m experiments.train --config configs/tnt_lm.py:size=tiny --workdir /tmp/tnt_tiny

Argument string (comma-separated key=value; all optional):
  size     tiny (CPU, minutes; the default) | small (~30M, one GPU) | paper150m (TNT paper)
  mixer    tnt | titans | ttt_linear | ttt_mlp | lact | attention | swa, a Titans hybrid
           mag:<memory> | mal:<memory> | mac:<memory> (e.g. mag:tnt; configs/titans.py sets up
           the Titans family), or a per-layer pattern joined by "+" (e.g. swa+tnt alternates)
  chunk    Titans/TTT/LaCT chunk size, or TNT's local chunk when `local_chunks` is not given
  local_chunks  TNT local chunk sizes joined by "+" (e.g. 4+8+16+32, one local memory each)
  stage    1 (default) | 2: TNT stage 2: continue from --config.init_from with local chunks
           `stage2_chunks` (default 1), local memories only, ~5% of stage 1's steps
  memory   the memory model of TNT's global and local memories and of Titans' memory: mlp (the
           default: 2 layers, expansion 4) | linear | swiglu, optionally with fields joined by
           "+", e.g. mlp+expansion=2 (tnt_jax/memory/models.py, MemoryModel.from_spec)
  data     stdlib (default: the Python standard library's source, no download) | a text file
           path or glob (byte level) | tokens:<dir> (shards from experiments/prepare_tokens.py)
  implementation  every memory mixer's op: xla (the default) | affine (linear memories) |
           pallas (the fused kernel; docs/kernel.md) | reference | pallas_interpret (tests)

Examples:
    # TNT stage 1 then stage 2 ({8} -> {1}) on the embedded corpus
    python -m experiments.train --config configs/tnt_lm.py:size=tiny --workdir /tmp/s1
    python -m experiments.train --config configs/tnt_lm.py:size=tiny,stage=2 \
        --config.init_from=/tmp/s1/checkpoints --workdir /tmp/s2
    # Titans baseline at chunk 64 on a novel, on a GPU
    python -m experiments.train --workdir /tmp/titans64 \
        --config configs/tnt_lm.py:size=small,mixer=titans,chunk=64,data=war_and_peace.txt
    # the paper's 150M TNT model, {8} local chunks, 16K context
    python -m experiments.train --config configs/tnt_lm.py:size=paper150m,data=tokens:/data/c4
Any field can then be overridden: --config.optim.lr=1e-3 --config.model.remat=True ...
"""

from ml_collections import config_dict

from tnt_jax.memory.models import MemoryModel

SIZES = {
    # d_model, layers, heads, seq_len, batch, steps, lr, TNT (C_G, S_L), default local chunk
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, seq_len=128, batch=16, steps=400,
                 lr=3e-3, global_chunk=64, shard=64, chunk=8, dtype="float32"),
    "small": dict(d_model=384, num_layers=6, num_heads=6, seq_len=2048, batch=16, steps=2000,
                  lr=1.5e-3, global_chunk=256, shard=512, chunk=8, dtype="bfloat16"),
    "paper150m": dict(d_model=768, num_layers=12, num_heads=12, seq_len=16384, batch=32,
                      steps=19073, lr=1e-3, global_chunk=2048, shard=2048, chunk=8,
                      dtype="bfloat16"),
}


ARGS = ("size", "mixer", "chunk", "local_chunks", "stage", "data", "stage2_chunks", "memory",
        "implementation")
MODEL_FIELDS = {"tnt": ("global_model", "local_model"), "titans": ("model",)}


def parse_args(arg: str, allowed=ARGS) -> dict[str, str]:
  """"k=v,k=v" -> {k: v}; a key outside `allowed` is an error naming it."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"config argument {item!r} must be key=value (in {arg!r})")
    out[key.strip()] = value.strip()
  unknown = set(out) - set(allowed)
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)} in {arg!r}; expected "
                     f"{tuple(allowed)}")
  return out


def _mixer_options(kinds, size, chunk, local_chunks):
  options = {}
  for kind in kinds:
    if kind == "tnt":
      options[kind] = dict(global_chunk=size["global_chunk"], local_chunks=local_chunks,
                           shard_lengths=size["shard"])
    elif kind == "lact":
      options[kind] = dict(chunk_size=chunk if chunk else size["global_chunk"])
    elif kind in ("titans", "ttt_linear", "ttt_mlp"):
      options[kind] = dict(chunk_size=chunk or size["chunk"])
  for kind in options:   # the inner optimiser's stability knobs (tnt_jax/layers/configs.py)
    options[kind]["chunk_lr_budget"] = 0.25
    # with mesh.context > 1: how the global memory's state crosses devices (gather | chain)
    options[kind]["global_handoff"] = "chain"
    # xla | affine (linear memories; docs/affine_scan.md) | pallas (the fused kernel where it
    # supports the memory; docs/kernel.md), and the kernel's settings, e.g. tile=32+save_every=8
    options[kind]["implementation"] = "xla"
    options[kind]["kernel_blocks"] = "default"
  return options


def _set_implementation(options, implementation: str) -> None:
  """Every memory mixer's op implementation, checked here (before any compile)."""
  from tnt_jax.ops.api import IMPLEMENTATIONS
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is unknown; expected one of "
                     f"{IMPLEMENTATIONS}")
  kinds = [kind for kind, o in options.items() if "implementation" in o]
  if not kinds:
    raise ValueError(f"implementation={implementation!r} sets the memory mixers' op; the "
                     f"mixers here are {sorted(options) or 'attention only'}")
  for kind in kinds:
    options[kind]["implementation"] = implementation


def _set_memory_model(options, spec: str) -> None:
  """Every TNT / Titans memory's model field set to `spec`, checked here (before any compile)."""
  MemoryModel.from_spec(spec)
  kinds = [kind for kind in options if kind in MODEL_FIELDS]
  if not kinds:
    raise ValueError(f"memory={spec!r} sets the model of TNT and Titans memories; the mixers "
                     f"here are {sorted(options) or 'attention only'}")
  for kind in kinds:
    for field in MODEL_FIELDS[kind]:
      options[kind][field] = spec


def get_config(arg: str = "") -> config_dict.ConfigDict:
  args = parse_args(arg)
  size_name = args.get("size", "tiny")
  if size_name not in SIZES:
    raise ValueError(f"size={size_name!r} is unknown; expected one of {tuple(SIZES)}")
  size = SIZES[size_name]
  kinds = args.get("mixer", "tnt").split("+")
  chunk = int(args["chunk"]) if "chunk" in args else None
  local_chunks = tuple(int(c) for c in args.get("local_chunks", str(chunk or size["chunk"]))
                       .split("+"))
  stage = int(args.get("stage", "1"))
  if stage not in (1, 2):
    raise ValueError(f"stage={stage} must be 1 or 2")

  c = config_dict.ConfigDict()
  c.seed = 0
  c.steps = size["steps"]
  c.log_every = 20 if size_name == "tiny" else 50
  c.eval_every = 200 if size_name == "tiny" else 500
  c.eval_batches = 8 if size_name == "tiny" else 16
  c.checkpoint_every = 200 if size_name == "tiny" else 500
  c.keep_checkpoints = 2
  c.stage = stage
  c.init_from = ""              # stage 2: a stage-1 workdir's checkpoints/ (or one step dir)
  c.train_only_local = False    # stage 2 sets True; --config.train_only_local=False unfreezes
  c.deterministic = False       # bitwise-reproducible GPU runs (tnt_jax/train/determinism.py)
  c.profile_steps = 0           # > 0: trace this many steps from profile_start (workdir/profile)
  c.profile_start = 10

  c.data = config_dict.ConfigDict()
  source = args.get("data", "stdlib")
  if source == "stdlib":
    c.data.source, c.data.path = "stdlib", ""
  elif source.startswith("tokens:"):
    c.data.source, c.data.path = "tokens", source[len("tokens:"):]
  else:
    c.data.source, c.data.path = "files", source
  c.data.seq_len = size["seq_len"]
  c.data.batch_size = size["batch"]
  c.data.validation_fraction = 0.02
  c.data.max_bytes = config_dict.placeholder(int)

  c.model = config_dict.ConfigDict()
  c.model.d_model = size["d_model"]
  c.model.num_layers = size["num_layers"]
  c.model.num_heads = size["num_heads"]
  c.model.head_dim = config_dict.placeholder(int)
  c.model.mlp_hidden = config_dict.placeholder(int)
  c.model.pattern = ",".join(kinds)
  # the layer kinds that take options: a hybrid's memory (mag:tnt -> tnt), or the kind itself
  layer_kinds = {k.partition(":")[2] or k for k in kinds}
  c.model.mixer_options = _mixer_options(layer_kinds, size, chunk, local_chunks)
  if "memory" in args:
    _set_memory_model(c.model.mixer_options, args["memory"])
  if "implementation" in args:
    _set_implementation(c.model.mixer_options, args["implementation"])
  c.model.window = min(512, size["seq_len"])
  c.model.tie_embeddings = True
  c.model.embedding_lookup = "auto"   # take | one_hot | auto (one_hot at small vocabularies)
  c.model.dtype = size["dtype"]
  c.model.remat = size_name == "paper150m"
  c.model.scan_layers = True    # one compiled block group instead of every block

  c.optim = config_dict.ConfigDict()
  c.optim.lr = size["lr"]
  c.optim.warmup_steps = max(10, c.steps // 20)
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.1
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.clip_norm = 1.0

  # context > 1: each sequence split over that many devices (TNT's local shards per device;
  # tnt_jax/parallel/context.py); data = -1 takes the remaining devices.
  c.mesh = config_dict.ConfigDict(dict(data=-1, fsdp=1, context=1))

  if stage == 2:
    if "tnt" not in layer_kinds:
      raise ValueError(f"stage=2 adapts TNT's local memories; mixer={'+'.join(kinds)} has none")
    stage2_chunks = tuple(int(x) for x in args.get("stage2_chunks", "1").split("+"))
    if len(stage2_chunks) == 1:
      stage2_chunks *= len(local_chunks)
    c.model.mixer_options["tnt"]["local_chunks"] = stage2_chunks
    c.steps = max(10, size["steps"] // 20)      # ~5% of stage 1, as in the paper
    c.optim.lr = size["lr"] / 3
    c.optim.warmup_steps = max(2, c.steps // 10)
    c.eval_every = c.checkpoint_every = max(1, c.steps // 2)
    c.log_every = max(1, c.steps // 10)
    c.train_only_local = True
  return c
