r"""Speed of tnt_jax's ops, variants side by side in one process.

    python -m experiments.benchmark --mode=op                        # the H100 table in docs/
    python -m experiments.benchmark --mode=op --lengths=2048 --chunks=8,64 --models=mlp  # CPU
    python -m experiments.benchmark --mode=layer --lengths=2048,8192,32768 --chunks=8,16,64,128
    python -m experiments.benchmark --mode=decode --d_model=384   # per-token decode cost
    python -m experiments.benchmark --mode=context   # 150M TNT, T x context devices
    python -m experiments.benchmark --mode=kernel --lengths=8192,32768 --head_dims=64,128

Kernel mode times the fused Pallas kernel (memory_op implementation="pallas") against the XLA
path on the same inputs (and, for linear memories, implementation="affine"), fwd and fwd+bwd,
for each (length, head dim, model, read, chunk); rows where the kernel would fall back name the
reason instead of a time. It then times a whole TNT
memory (global --global_chunk chunk-start + one local of chunk --kernel_local_chunk, shards of
--shard_length; one per --tnt_models) both ways, and cuDNN causal attention with the same heads.
--kernel_profile_top=N also profiles each variant and prints its N costliest GPU kernels, XLA's
fusions named by shape and JAX op path (tnt_jax/profiling.py).

Layer mode times a whole memory layer (projections, conv, gates, memories, output) for TNT
(global C_G = --global_chunk, one local of chunk C, shards of --shard_length) against Titans
(one memory of chunk C), and a causal-attention layer with the same projections, at a fixed
--tokens per step (batch = tokens / T).

For each variant it prints tokens/s, step time (median of --reps timed runs after --warmup),
TFLOP/s from the analytic FLOP count (tnt_jax/ops/flops.py), MFU against the bf16 matmul peak
measured in the same process, and XLA's memory estimate (arguments + outputs + temporaries).
Results are appended as JSON lines to --out; --plot draws docs-ready figures from such a file.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from tnt_jax import profiling
from tnt_jax.layers import MemoryLayer, TitansLayerConfig, TNTLayerConfig
from tnt_jax.layers.flops import memory_layer_flops
from tnt_jax.memory import Gates, MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops import affine, flops
from tnt_jax.kernels.chunk_memory import PLATFORM_DRIVER, KernelBlocks, uses_tiles
from tnt_jax.ops.api import kernel_fallback_reason, memory_op
from tnt_jax.ops.tnt import LocalMemory, TNTConfig, tnt_op

flags.DEFINE_enum("mode", "op", ["op", "layer", "decode", "context", "kernel"],
                  "what to measure")
flags.DEFINE_list("head_dims", ["64", "128"], "kernel mode: head dimensions")
flags.DEFINE_integer("kernel_local_chunk", 16, "kernel mode: the TNT local memory's chunk")
flags.DEFINE_bool("kernel_tnt", True, "kernel mode: also time a whole TNT memory per length")
flags.DEFINE_integer("kernel_profile_top", 0, "kernel mode: also profile each variant and "
                     "print its N kernels with the most device time, each XLA fusion with its "
                     "shape and JAX op path (0: no profile)")
flags.DEFINE_list("tnt_models", ["mlp"], "kernel mode: the memory model of the whole TNT "
                  "memory's global and local (one row each: 'tnt' for mlp, 'tnt/<model>' else)")
flags.DEFINE_list("affine_blocks", ["auto"], "kernel mode: also time implementation='affine' "
                  "(ops/affine.py) where the memory is linear, with these chunks per block "
                  "('auto': the op's default); empty: not at all")
flags.DEFINE_list("affine_precisions", ["highest"], "kernel mode: the affine scan's "
                  "map_precision values to compare (ops/affine.py MAP_PRECISIONS)")
flags.DEFINE_list("kernel_blocks", ["default"], "kernel mode: KernelBlocks settings to compare "
                  "side by side, each 'default' or fields joined by '+', e.g. "
                  "'save_every=1+backward_num_warps=4'")
flags.DEFINE_string("context_config", "size=paper150m",
                    "context mode: the model, as configs/tnt_lm.py's argument")
flags.DEFINE_list("context_lengths", ["32768", "65536", "131072"],
                  "context mode: sequence lengths T (tokens per sequence, over all its GPUs)")
flags.DEFINE_list("context_devices", ["1", "2", "4", "8"],
                  "context mode: context axis sizes N (those above the device count are skipped)")
flags.DEFINE_list("context_implementations", ["xla"],
                  "context mode: the memory mixers' op implementations to compare (xla, pallas)")
flags.DEFINE_list("global_handoffs", ["chain"],
                  "context mode: the global memory's hand-offs to compare (gather, chain)")
flags.DEFINE_list("longest_lengths", [],
                  "context mode: then these T on the most devices, in order, until one fails")
flags.DEFINE_integer("compile_threads", 8, "context mode: variants compiled at once")
flags.DEFINE_bool("profile", True, "context mode: profile each multi-device step to split "
                  "communication from compute (tnt_jax/profiling.py)")
flags.DEFINE_integer("profile_devices", 2, "context mode: GPUs whose kernels the profile split "
                     "reads (0: all; each costs a walk over its kernel events in Python)")
flags.DEFINE_list("decode_kinds", ["tnt", "titans", "swa", "attention"],
                  "decode mode: the mixer of every block")
flags.DEFINE_list("positions", ["1024", "8192", "32768"], "decode mode: stream positions")
flags.DEFINE_list("batches", ["1", "32"], "decode mode: batch sizes")
flags.DEFINE_integer("decode_layers", 6, "decode mode: blocks (d_model from --d_model)")
flags.DEFINE_integer("decode_steps", 32, "decode mode: timed decode steps per point")
flags.DEFINE_list("kinds", ["tnt", "titans"], "layer mode: layer kinds")
flags.DEFINE_integer("d_model", 768, "layer mode: model width")
flags.DEFINE_integer("tokens", 32768, "layer mode: tokens per step (batch = tokens / length)")
flags.DEFINE_integer("global_chunk", 2048, "layer mode: TNT's C_G")
flags.DEFINE_list("layer_implementations", ["xla"], "layer mode: the memory op implementations "
                  "(MemoryLayerConfig.implementation: xla | pallas | ...) to time each TNT and "
                  "Titans layer with")
flags.DEFINE_integer("shard_length", 2048, "layer mode: TNT's S_L")
flags.DEFINE_list("models", ["mlp", "linear"], "memory models")
flags.DEFINE_list("chunks", ["8", "16", "64", "256", "2048"], "chunk sizes")
flags.DEFINE_list("reads", ["cumulative", "chunk_start"], "read modes")
flags.DEFINE_integer("max_cumulative_chunk", 256,
                     "cumulative reads only up to this chunk (C x C coefficients per chunk)")
flags.DEFINE_integer("min_chunk_start_chunk", 64, "chunk-start reads only from this chunk up")
flags.DEFINE_list("lengths", ["8192", "32768"], "sequence lengths T")
flags.DEFINE_string("rule", "titans", "update rule: gd | titans")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 12, "heads")
flags.DEFINE_integer("head_dim", 64, "head dimension")
flags.DEFINE_float("expansion", 4.0, "mlp hidden = expansion * head_dim")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype of q, k, v")
flags.DEFINE_list("passes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd")
flags.DEFINE_list("unrolls", ["auto"], "scan unroll factors to compare ('auto': the op's default)")
flags.DEFINE_bool("remat", False, "rematerialise chunk steps in the backward pass")
flags.DEFINE_bool("attention", True, "add causal dot-product attention (cuDNN on GPU) rows")
flags.DEFINE_integer("warmup", 2, "untimed runs after compilation")
flags.DEFINE_integer("reps", 5, "timed runs (median reported)")
flags.DEFINE_string("out", "", "append results as JSON lines here")
flags.DEFINE_string("plot", "", "instead of measuring: draw PNG figures from this JSONL file")
flags.DEFINE_string("plot_prefix", "docs/op_benchmark", "figure path prefix for --plot")
FLAGS = flags.FLAGS


def median_seconds(fn, args, warmup: int, reps: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measured_matmul_peak(dtype=jnp.bfloat16) -> float:
  """FLOP/s of a large square matmul on this device (the MFU denominator)."""
  n = 8192 if jax.default_backend() == "gpu" else 1024
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
  mm = jax.jit(lambda a, b: a @ b)
  return 2 * n**3 / median_seconds(mm, (a, b), warmup=3, reps=10)


def memory_bytes(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # not every backend reports it
    return None


def op_inputs(config: MemoryConfig, batch, length, heads, head_dim, dtype):
  keys = jax.random.split(jax.random.key(0), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  shape = (batch, length, heads, head_dim)
  q = unit(jax.random.normal(keys[0], shape)).astype(dtype)
  k = unit(jax.random.normal(keys[1], shape)).astype(dtype)
  v = jax.random.normal(keys[2], shape).astype(dtype)
  gate = lambda key, s: s * jax.nn.sigmoid(jax.random.normal(key, (batch, length, heads)))
  needed = config.rule.required_gates()
  gates = Gates(gate(keys[3], 0.1), gate(keys[4], 1.0) if "eta" in needed else None,
                gate(keys[5], 0.01) if "alpha" in needed else None)
  weights = config.model.init_fast_weights(keys[6], heads, head_dim)
  return (q, k, v, gates, config.init_state(weights, batch),
          config.model.init_slow_params(heads, head_dim))


def timed_variant(fn, args, flop_count, peak, row):
  return time_compiled(compile_timed(fn, args, row), args, flop_count, peak, row)


def compile_timed(fn, args, row):
  """jit(fn) lowered and compiled for args; the seconds that took go into row["compile_s"]
  (the fused kernels' compile is a cost users pay once per shape)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  row["compile_s"] = time.perf_counter() - start
  return compiled


def time_compiled(compiled, args, flop_count, peak, row):
  seconds = median_seconds(compiled, args, FLAGS.warmup, FLAGS.reps)
  tokens = row["batch"] * row["length"]
  row.update(seconds=seconds, tokens_per_s=tokens / seconds, tflops=flop_count / seconds / 1e12,
             mfu=flop_count / seconds / peak, memory_gb=(memory_bytes(compiled) or 0) / 1e9)
  return row


def memory_configs():
  """(model name, read, chunk, MemoryConfig) for every --models x --reads x --chunks kept."""
  for model_name in FLAGS.models:
    for read in FLAGS.reads:
      for chunk in map(int, FLAGS.chunks):
        if read == "cumulative" and chunk > FLAGS.max_cumulative_chunk:
          continue
        if read == "chunk_start" and chunk < FLAGS.min_chunk_start_chunk:
          continue
        model = MemoryModel(model_name, expansion=FLAGS.expansion)
        yield model_name, read, chunk, MemoryConfig(model, UpdateRule(FLAGS.rule), "l2", read,
                                                    chunk)


def op_variants():
  dtype = jnp.dtype(FLAGS.dtype)
  for length in map(int, FLAGS.lengths):
    for model_name, read, chunk, config in memory_configs():
      for unroll in FLAGS.unrolls:
        unroll = None if unroll == "auto" else int(unroll)
        yield length, model_name, read, chunk, unroll, config, dtype
    if FLAGS.attention:
      yield length, "attention", "causal", 0, None, None, dtype


def run_op_mode(peak):
  b, h, d = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
  for length, model_name, read, chunk, unroll, config, dtype in op_variants():
    for pass_name in FLAGS.passes:
      backward = pass_name == "fwd+bwd"
      row = dict(mode="op", device=jax.devices()[0].device_kind, model=model_name, read=read,
                 rule=FLAGS.rule if config else "", chunk=chunk, length=length,
                 unroll="auto" if unroll is None else unroll,
                 batch=b, heads=h, head_dim=d, dtype=str(dtype), passes=pass_name,
                 remat=FLAGS.remat)
      if config is None:
        args, fn = _attention_case(b, length, h, d, dtype, backward)
        count = flops.causal_attention_flops(b, length, h, d, backward)
      else:
        args = op_inputs(config, b, length, h, d, dtype)
        fn = _op_case(config, unroll, backward)
        count = flops.memory_op_flops(config, b, length, h, d, backward)
      try:
        yield timed_variant(fn, args, count, peak, row)
      except Exception as e:  # one failing variant (e.g. out of memory) must not end the run
        yield dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _op_case(config, unroll, backward, implementation="xla", kernel_blocks=None):
  """kernel_blocks: the kernel's KernelBlocks, or for implementation="affine" the keyword
  arguments of affine.affine_memory."""
  def forward(q, k, v, gates, state, slow):
    if implementation == "affine":
      return affine.affine_memory(q, k, v, gates, state, slow, config, **kernel_blocks)
    return memory_op(q, k, v, gates, state, slow, config, remat=FLAGS.remat, unroll=unroll,
                     implementation=implementation, kernel_blocks=kernel_blocks)

  if not backward:
    return forward

  def loss(q, k, v, gates, state, slow):
    out, final = forward(q, k, v, gates, state, slow)
    return jnp.mean(out.astype(jnp.float32) ** 2) + sum(
        jnp.mean(x) for x in jax.tree.leaves(final))

  return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))


def _loss_grad(forward):
  def loss(*args):
    out = forward(*args)
    out, final = out if isinstance(out, tuple) else (out, None)
    return jnp.mean(out.astype(jnp.float32) ** 2) + sum(
        jnp.mean(x) for x in jax.tree.leaves(final))
  return jax.grad(loss, argnums=tuple(range(7)))


def kernel_variants():
  for length in map(int, FLAGS.lengths):
    for head_dim in map(int, FLAGS.head_dims):
      for model_name, read, chunk, config in memory_configs():
        yield length, head_dim, model_name, read, chunk, config
      if FLAGS.kernel_tnt:
        for tnt_model in FLAGS.tnt_models:
          name = "tnt" if tnt_model == "mlp" else f"tnt/{tnt_model}"
          yield length, head_dim, name, "", FLAGS.kernel_local_chunk, tnt_model
      if FLAGS.attention:
        yield length, head_dim, "attention", "causal", 0, "attention"


def tnt_memory_case(length, head_dim, dtype, backward, implementation, kernel_blocks=None,
                    model_name="mlp"):
  """A whole TNT memory: a global (chunk-start) + one local (cumulative) of model_name, Q-K
  projection."""
  b, h = FLAGS.batch, FLAGS.heads
  model = MemoryModel(model_name, expansion=FLAGS.expansion)
  glob = MemoryConfig(model, UpdateRule(FLAGS.rule), "l2", "chunk_start",
                      min(FLAGS.global_chunk, length))
  local = LocalMemory(MemoryConfig(model, UpdateRule(FLAGS.rule), "l2", "cumulative",
                                   FLAGS.kernel_local_chunk),
                      shard_length=min(FLAGS.shard_length, length))
  config = TNTConfig(glob, (local,), qk_projection=True)
  q, k, v, g0, state, slow = op_inputs(glob, b, length, h, head_dim, dtype)
  *_, g1, local_state, _ = op_inputs(local.memory, b, length, h, head_dim, dtype)
  inits = (jax.tree.map(lambda w: w[0], local_state.weights),)
  args = (q, k, v, (g0, g1), state, inits, (slow, slow))

  def forward(q, k, v, gates, state, inits, slows):
    return tnt_op(q, k, v, gates, state, inits, slows, config, implementation=implementation,
                  remat=FLAGS.remat, kernel_blocks=kernel_blocks)

  count = (flops.memory_op_flops(glob, b, length, h, head_dim, backward)
           + flops.memory_op_flops(local.memory, b, length, h, head_dim, backward))
  return (_loss_grad(forward) if backward else forward), args, count, (glob, local.memory)


def kernel_implementations():
  """(row label, implementation, settings) per compared path: xla, the affine scan with each
  --affine_blocks x --affine_precisions (settings: affine_memory's keywords), then the kernel
  with each --kernel_blocks setting (settings: KernelBlocks; the defaults labelled "pallas")."""
  yield "xla", "xla", None
  for block in FLAGS.affine_blocks:
    for precision in FLAGS.affine_precisions:
      label = "affine" + ("" if block == "auto" else f"/L={block}") + (
          "" if precision == "highest" else f"/{precision}")
      yield label, "affine", dict(block_chunks=None if block == "auto" else int(block),
                                  map_precision=precision)
  for spec in FLAGS.kernel_blocks:
    yield ("pallas" if spec == "default" else f"pallas/{spec}"), "pallas", \
        KernelBlocks.from_spec(spec)


def run_kernel_mode(peak):
  b, h = FLAGS.batch, FLAGS.heads
  dtype = jnp.dtype(FLAGS.dtype)
  for length, head_dim, model_name, read, chunk, config in kernel_variants():
    paths = [("xla", "xla", None)] if config == "attention" else list(kernel_implementations())
    for label, implementation, blocks in paths:
      tnt_model = config if model_name.startswith("tnt") else None
      if implementation == "affine" and (tnt_model or affine.unsupported_reason(config)):
        continue   # an mlp memory would run xla again; the TNT row compares xla and kernels
      for pass_name in FLAGS.passes:
        backward = pass_name == "fwd+bwd"
        row = dict(mode="kernel", device=jax.devices()[0].device_kind, model=model_name,
                   read=read, rule=FLAGS.rule, chunk=chunk, length=length, unroll="auto",
                   batch=b, heads=h, head_dim=head_dim, dtype=str(dtype), passes=pass_name,
                   remat=FLAGS.remat, implementation=label)
        try:
          if config == "attention":
            args, fn = _attention_case(b, length, h, head_dim, dtype, backward)
            count = flops.causal_attention_flops(b, length, h, head_dim, backward)
            row.update(implementation="cudnn" if jax.default_backend() == "gpu" else "xla",
                       rule="")
          elif tnt_model:
            fn, args, count, memories = tnt_memory_case(length, head_dim, dtype, backward,
                                                         implementation, blocks, tnt_model)
            if implementation == "pallas":
              reasons = [kernel_fallback_reason(m, head_dim, dtype, False, blocks)
                         for m in memories]
              row["fallback"] = "; ".join(f"{name}: {r}" for name, r in
                                          zip(("global", "local"), reasons) if r)
          else:
            if implementation == "pallas":
              reason = kernel_fallback_reason(config, head_dim, dtype, False, blocks)
              if reason:
                yield dict(row, fallback=reason)
                continue
              driver = PLATFORM_DRIVER.get(jax.default_backend(), "sequential_grid")
              row["kernel"] = ("tiles" if uses_tiles(config, head_dim, driver,
                                                     blocks or KernelBlocks()) else "rows")
            args = op_inputs(config, b, length, h, head_dim, dtype)
            fn = _op_case(config, None, backward, implementation, blocks)
            count = flops.memory_op_flops(config, b, length, h, head_dim, backward)
          compiled = compile_timed(fn, args, row)
          row = time_compiled(compiled, args, count, peak, row)
          if FLAGS.kernel_profile_top:
            row["top_kernels"] = top_kernels(compiled, args, FLAGS.kernel_profile_top)
          yield row
        except Exception as e:  # one failing variant (e.g. out of memory) must not end the run
          yield dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def top_kernels(compiled, args, top: int) -> dict:
  """The profiled device time of one run: all kernels' summed ms, and the `top` kernel names
  with the most, each [launches, ms] per run."""
  kernels = profiling.profile_kernels(compiled, args, FLAGS.reps)
  ranked = sorted(kernels.items(), key=lambda item: -item[1][1])[:top]
  origins = profiling.hlo_origins(compiled.as_text(), kernels)
  return dict(total_ms=sum(ms for _, ms in kernels.values()),
              kernels=[[name, count, ms, origins.get(name, "")] for name, (count, ms) in ranked])


def format_kernel_row(r) -> str:
  name = (f"{r['model']:10s} {r['read'] or '-':11s} C={r['chunk']:<5d} d={r['head_dim']:<4d} "
          f"T={r['length']:<6d} {r['implementation']:21s} {r['passes']:8s}")
  if "error" in r:
    return f"{name} FAILED {r['error']}"
  if "seconds" not in r:
    return f"{name} falls back to xla: {r['fallback']}"
  note = f"  [xla for {r['fallback']}]" if r.get("fallback") else ""
  note += f"  [{r['kernel']} kernel]" if r.get("kernel") else ""
  line = (f"{name} {r['tokens_per_s'] / 1e3:10.1f}K tok/s {r['seconds'] * 1e3:9.2f} ms "
          f"{r['tflops']:7.2f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  mem {r['memory_gb']:6.2f} GB"
          f"  compile {r['compile_s']:5.1f} s{note}")
  if "top_kernels" in r:
    line += (f"\n    kernels sum to {r['top_kernels']['total_ms']:.3f} ms; the most:"
             if r["top_kernels"]["kernels"] else "\n    the profile holds no device kernels")
    for kernel, count, ms, origin in r["top_kernels"]["kernels"]:
      line += f"\n    {ms:8.3f} ms  x{count:<5d} {kernel[:110]}"
      line += f"\n{'':22s}{origin[:200]}" if origin else ""
  return line


def _attention_case(b, length, h, d, dtype, backward):
  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (b, length, h, d), dtype) for key in keys)
  impl = "cudnn" if jax.default_backend() == "gpu" else None

  def forward(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

  if not backward:
    return (q, k, v), forward
  grad = jax.grad(lambda q, k, v: jnp.mean(forward(q, k, v).astype(jnp.float32) ** 2),
                  argnums=(0, 1, 2))
  return (q, k, v), grad


def layer_config(kind: str, chunk: int, length: int, implementation: str = "xla"):
  common = dict(d_model=FLAGS.d_model, num_heads=FLAGS.heads, head_dim=FLAGS.head_dim,
                remat=FLAGS.remat, implementation=implementation)
  if kind == "titans":
    return TitansLayerConfig(chunk_size=chunk, **common)
  shard = min(FLAGS.shard_length, length)
  return TNTLayerConfig(global_chunk=min(FLAGS.global_chunk, length), local_chunks=(chunk,),
                        shard_lengths=shard, **common)


def run_layer_mode(peak):
  dtype = jnp.dtype(FLAGS.dtype)
  for length in map(int, FLAGS.lengths):
    batch = max(1, FLAGS.tokens // length)
    x = jax.random.normal(jax.random.key(0), (batch, length, FLAGS.d_model), dtype)
    cases = [(kind, int(c), impl) for kind in FLAGS.kinds for c in FLAGS.chunks
             for impl in FLAGS.layer_implementations]
    if FLAGS.attention:
      cases.append(("attention", 0, "cudnn" if jax.default_backend() == "gpu" else "xla"))
    for kind, chunk, implementation in cases:
      for pass_name in FLAGS.passes:
        backward = pass_name == "fwd+bwd"
        row = dict(mode="layer", device=jax.devices()[0].device_kind, model=kind, read="",
                   rule="", chunk=chunk, length=length, unroll="auto", batch=batch,
                   heads=FLAGS.heads, head_dim=FLAGS.head_dim, d_model=FLAGS.d_model,
                   dtype=str(dtype), passes=pass_name, remat=FLAGS.remat,
                   implementation=implementation)
        try:
          if kind == "attention":
            fn, args, count = _attention_layer_case(x, backward)
          else:
            config = layer_config(kind, chunk, length, implementation)
            fn, args = _layer_case(config, x, dtype, backward)
            count = memory_layer_flops(config, batch, length, backward)
          yield timed_variant(fn, args, count, peak, row)
        except Exception as e:  # one failing variant (e.g. out of memory) must not end the run
          yield dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def _layer_case(config, x, dtype, backward):
  graphdef, params, rest = nnx.split(MemoryLayer(config, rngs=nnx.Rngs(0), dtype=dtype),
                                     nnx.Param, ...)

  def forward(params, x):
    return nnx.merge(graphdef, params, rest)(x)

  if not backward:
    return forward, (params, x)
  loss = lambda params, x: jnp.mean(forward(params, x).astype(jnp.float32) ** 2)
  return jax.grad(loss, argnums=(0, 1)), (params, x)


def _attention_layer_case(x, backward):
  """q, k, v, output-gate and output projections around cuDNN causal attention."""
  b, t, d = x.shape
  h, hd = FLAGS.heads, FLAGS.head_dim
  keys = jax.random.split(jax.random.key(2), 5)
  params = [jax.random.normal(k, (d, h * hd), jnp.float32) / d**0.5 for k in keys[:4]]
  params.append(jax.random.normal(keys[4], (h * hd, d), jnp.float32) / (h * hd)**0.5)
  impl = "cudnn" if jax.default_backend() == "gpu" else None

  def forward(params, x):
    wq, wk, wv, wg, wo = (p.astype(x.dtype) for p in params)
    heads = lambda y: y.reshape(b, t, h, hd)
    o = jax.nn.dot_product_attention(heads(x @ wq), heads(x @ wk), heads(x @ wv),
                                     is_causal=True, implementation=impl)
    return (o.reshape(b, t, h * hd) * jax.nn.silu(x @ wg)) @ wo

  count = (2.0 * b * t * 5 * d * h * hd * (3 if backward else 1)
           + flops.causal_attention_flops(b, t, h, hd, backward))
  if not backward:
    return forward, (params, x), count
  loss = lambda params, x: jnp.mean(forward(params, x).astype(jnp.float32) ** 2)
  return jax.grad(loss, argnums=(0, 1)), (params, x), count


def format_row(r) -> str:
  name = (f"{r['model']:10s} {r['rule'] or '-':6s} {r['read']:11s} C={r['chunk']:<5d} "
          f"u={r['unroll']:<4} T={r['length']:<6d}")
  if r["mode"] == "layer":
    name += f" {r.get('implementation', 'xla'):6s}"
  if "error" in r:
    return f"{name} {r['passes']:8s} FAILED {r['error']}"
  return (f"{name} {r['passes']:8s} {r['tokens_per_s'] / 1e3:10.1f}K tok/s "
          f"{r['seconds'] * 1e3:9.2f} ms {r['tflops']:8.2f} TFLOP/s  MFU {100 * r['mfu']:5.1f}% "
          f" mem {r['memory_gb']:6.2f} GB  compile {r['compile_s']:5.1f} s")


def plot(path: str, prefix: str):
  """tokens/s against chunk size: one line per (model, read, length); attention as lines."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  import glob
  files = sorted(glob.glob(path))
  if not files:
    raise FileNotFoundError(f"--plot={path!r} matches no file")
  rows = [json.loads(line) for f in files for line in open(f) if line.strip()]
  rows = [r for r in rows if "error" not in r and r["mode"] == FLAGS.mode]
  if FLAGS.mode == "decode":
    return plot_decode(rows, prefix, plt)
  if FLAGS.mode == "context":
    return plot_context(rows, prefix, plt)
  if FLAGS.mode == "kernel" and any(r["model"].startswith("tnt") for r in rows):
    plot_kernel_tnt(rows, prefix, plt)
    rows = [r for r in rows if not r["model"].startswith("tnt")]
    if all(r["model"] == "attention" for r in rows):
      return None
  for pass_name in sorted({r["passes"] for r in rows}):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # One line per path too: rows of several implementations at one chunk are not a curve.
    path = lambda r: r.get("implementation", "xla")
    series = sorted({(r["model"], r["read"], r["length"], path(r)) for r in rows
                     if r["passes"] == pass_name and r["model"] != "attention"})
    for model, read, length, impl in series:
      pts = sorted((r["chunk"], r["tokens_per_s"]) for r in rows
                   if (r["model"], r["read"], r["length"], r["passes"], path(r)) ==
                   (model, read, length, pass_name, impl) and r["unroll"] == "auto")
      ax.plot(*zip(*pts), marker="o",
              label=f"{model} {read} T={length} {impl}".replace("  ", " "))
    for r in rows:
      if r["model"] == "attention" and r["passes"] == pass_name:
        ax.axhline(r["tokens_per_s"], ls="--", lw=1, color="gray")
        ax.text(8, r["tokens_per_s"] * 1.05, f"cuDNN attention T={r['length']}", fontsize=7)
    xlabel = "chunk size C (TNT: local C_L)" if FLAGS.mode == "layer" else "chunk size C"
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="tokens/s",
           title=f"memory {FLAGS.mode}, {pass_name}, {rows[0]['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = f"{prefix}_{pass_name.replace('+', '_')}.png"
    fig.savefig(out, dpi=120)
    print("wrote", out)


def plot_kernel_tnt(rows, prefix, plt):
  """Kernel mode's whole-TNT-memory rows: one bar per (length, head dim, memory, rule, path) with
  cuDNN attention's at the same length and head dim, one figure per pass."""
  for pass_name in sorted({r["passes"] for r in rows}):
    times = {}
    for r in rows:
      if r["passes"] != pass_name or "seconds" not in r:
        continue
      if r["model"] == "attention":
        label, colour = "cuDNN causal attention", "gray"
      elif r["model"].startswith("tnt"):
        label, colour = f"{r['model']} {r['rule']} {r['implementation']}", "C0"
      else:
        continue
      times[(r["length"], r["head_dim"], r["model"] == "attention", label)] = (
          r["seconds"] * 1e3, colour)                                  # the last row wins
    if not any(not attention for _, _, attention, _ in times):
      continue
    keys = sorted(times)
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(keys) + 1.3))
    values = [times[key][0] for key in keys]
    ax.barh(range(len(keys)), values, color=[times[key][1] for key in keys])
    ax.set_yticks(range(len(keys)),
                  [f"T={t // 1024}K d={d}  {label}" for t, d, _, label in keys], fontsize=7)
    ax.invert_yaxis()
    for i, value in enumerate(values):
      ax.text(value, i, f" {value:.2f}", va="center", fontsize=7)
    ax.set(xlabel=f"ms per step (median), {rows[0]['device']}",
           title=f"a whole TNT memory against attention, {pass_name}")
    fig.tight_layout()
    out = f"{prefix}_tnt_{pass_name.replace('+', '_')}.png"
    fig.savefig(out, dpi=120)
    print("wrote", out)


def decode_model(kind: str, d_model: int, layers: int):
  """The small training config's shapes (configs/tnt_lm.py size=small), random weights."""
  from tnt_jax.models import LMConfig, LanguageModel
  options = {"tnt": dict(global_chunk=256, local_chunks=(8,), shard_lengths=512),
             "titans": dict(chunk_size=8)}
  config = LMConfig(vocab_size=256, d_model=d_model, num_layers=layers,
                    num_heads=max(1, d_model // 64), pattern=(kind,),
                    mixer_options={k: v for k, v in options.items() if k == kind}, window=512,
                    dtype="bfloat16")
  return LanguageModel(config, rngs=nnx.Rngs(0))


def run_decode_mode(peak):
  """Per-token decode latency at growing stream positions: prefill (parallel form, untimed) to
  each position, then time single-token greedy steps. Memory models and SWA continue one stream;
  full attention gets a cache of exactly position + steps slots at each position (its per-token
  cost grows with the context, which is the point of comparison)."""
  del peak
  from tnt_jax.models.decoding import Decoder
  positions = sorted(int(p) for p in FLAGS.positions)
  for kind in FLAGS.decode_kinds:
    model = decode_model(kind, FLAGS.d_model, FLAGS.decode_layers)
    for batch in (int(b) for b in FLAGS.batches):
      tokens = jax.random.randint(jax.random.key(1), (batch, positions[-1]), 0, 256)
      decoder, cache, done = None, None, 0
      for position in positions:
        if kind == "attention" or decoder is None:
          # Full attention: a bounded prefill segment keeps its score matrices small.
          segment = 2048 if kind != "attention" else max(128, 8192 // batch)
          decoder = Decoder(model, max_length=position + FLAGS.decode_steps + 8
                            if kind == "attention" else None, segment=segment)
          cache, done = decoder.init_cache(batch), 0
        start = time.perf_counter()
        _, cache = decoder.prefill(tokens[:, done:position], cache)
        jax.block_until_ready(cache)
        prefill_s, done = time.perf_counter() - start, position
        # Steps consume (donate) their cache: time them on a copy, continue the stream from cache.
        token, step_cache = tokens[:, position - 1], jax.tree.map(jnp.copy, cache)
        times = []
        for i in range(FLAGS.decode_steps + 3):
          t0 = time.perf_counter()
          token, _, step_cache = decoder._sample_step(decoder.state, token, step_cache,
                                                      jax.random.key(i), 0.0, 0, 1.0)
          jax.block_until_ready(token)
          if i >= 3:                      # the first steps compile and warm up
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves(step_cache))
        yield dict(mode="decode", kind=kind, batch=batch, position=position,
                   step_ms=step * 1e3, tokens_per_s=batch / step, cache_mb=cache_bytes / 2**20,
                   prefill_s=prefill_s, layers=FLAGS.decode_layers, d_model=FLAGS.d_model)


def plot_context(rows, prefix, plt):
  """Left: tokens/s against GPUs per sequence, one line per T, ideal scaling dashed. Right:
  tokens/s against T at 1 GPU and at the most GPUs. Repeated measurements are averaged; rows
  of one implementation (the first row's) only."""
  implementation = rows[0].get("implementation", "xla")
  rows = [r for r in rows if r.get("implementation", "xla") == implementation]
  points = {}
  for r in rows:
    points.setdefault((r["length"], r["devices"], r["handoff"]), []).append(r["tokens_per_s"])
  tps = {key: sum(v) / len(v) for key, v in points.items()}
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  for length in sorted({t for t, n, _ in tps if n == 1}):   # lengths with a 1-GPU baseline
    gather = sorted((n, v) for (t, n, h), v in tps.items() if t == length and h == "gather")
    line, = left.plot(*zip(*gather), marker="o", label=f"T={length // 1024}K gather")
    if gather[0][0] == 1:
      left.plot([1, gather[-1][0]], [gather[0][1], gather[0][1] * gather[-1][0]], ls="--",
                lw=0.8, color=line.get_color())
    chain = sorted((n, v) for (t, n, h), v in tps.items() if t == length and h == "chain")
    if chain:
      left.plot(*zip(*chain), marker="s", ls="none", mfc="none", ms=9,
                color=line.get_color(), label=f"T={length // 1024}K chain")
  left.set(xscale="log", yscale="log", xlabel="GPUs per sequence (context axis)",
           ylabel="tokens/s", title="strong scaling (dashed: ideal)")
  left.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
  left.minorticks_off()
  left.legend(fontsize=7)
  for n in sorted({n for _, n, _ in tps}):
    pts = sorted((t, v) for (t, m, h), v in tps.items() if m == n and h == "gather")
    right.plot(*zip(*pts), marker="o", label=f"{n} GPU{'s' if n > 1 else ''}")
  right.set(xscale="log", yscale="log", xlabel="tokens per sequence T", ylabel="tokens/s",
            title="sequence length (gather hand-off)")
  right.legend(fontsize=7)
  for ax in (left, right):
    ax.grid(alpha=0.3, which="both")
  fig.suptitle(f"{rows[0].get('config', '')} training step, {rows[0]['device']}", fontsize=9)
  fig.tight_layout()
  out = f"{prefix}.png"
  fig.savefig(out, dpi=120)
  print("wrote", out)


def plot_decode(rows, prefix, plt):
  """ms per decode step against stream position, one panel per batch size."""
  batches = sorted({r["batch"] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
  for ax, batch in zip(axes[0], batches):
    for kind in dict.fromkeys(r["kind"] for r in rows):
      pts = sorted((r["position"], r["step_ms"]) for r in rows
                   if r["kind"] == kind and r["batch"] == batch)
      ax.plot(*zip(*pts), marker="o", label=kind)
    ax.set(xscale="log", xlabel="stream position (tokens)", ylabel="ms per decode step",
           title=f"batch {batch}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  out = f"{prefix}.png"
  fig.savefig(out, dpi=120)
  print("wrote", out)


def context_model_config(config_arg: str, handoff: str, implementation: str = "xla"):
  """The LM of configs/tnt_lm.py:<config_arg> (byte vocabulary), its global memories handing
  their state across devices by `handoff`, its memory mixers' ops on `implementation`."""
  from configs.tnt_lm import get_config, parse_args
  from tnt_jax.train.trainer import lm_config
  if "implementation" in parse_args(config_arg):
    raise ValueError(f"--context_config={config_arg!r} sets implementation; the context mode "
                     "takes it from --context_implementations")
  config = lm_config(get_config(f"{config_arg},implementation={implementation}"),
                     vocab_size=256)
  options = {kind: dict(o, global_handoff=handoff) if "global_handoff" in o else dict(o)
             for kind, o in config.mixer_options.items()}   # the memory mixers have the key
  return dataclasses.replace(config, mixer_options=options)


def context_points():
  """(total length T, context devices N, hand-off, is a --longest_lengths point,
  implementation): every T x N x implementation that fits the devices here (1-GPU points
  first, so efficiencies can be computed as rows come), then the --longest_lengths on the most
  devices."""
  available = jax.device_count()
  devices = sorted({int(n) for n in FLAGS.context_devices if int(n) <= available})
  for implementation in FLAGS.context_implementations:
    for n in devices:
      for length in map(int, FLAGS.context_lengths):
        for handoff in (FLAGS.global_handoffs if n > 1 else ["gather"]):
          yield length, n, handoff, False, implementation
    for length in map(int, FLAGS.longest_lengths):
      yield length, devices[-1], FLAGS.global_handoffs[0], True, implementation


def run_context_mode(peak):
  """Training step (loss + gradients, batch 1) of a TNT LM with the sequence of T tokens split
  over N devices (tnt_jax/parallel/context.py). Scaling efficiency: strong = tok/s at (T, N)
  over N x tok/s at (T, 1); weak = over N x tok/s at (T / N, 1). Communication: the NCCL
  kernels' share of the profiled step (tnt_jax/profiling.py). Variants are traced one by one
  and compiled --compile_threads at a time (XLA compiles without the GIL), then timed alone."""
  import concurrent.futures
  from tnt_jax.models import LanguageModel
  from tnt_jax.models.flops import lm_train_flops
  from tnt_jax.parallel import mesh as mesh_lib
  from tnt_jax.parallel.context import use_gspmd_on_gpu
  from tnt_jax.profiling import profile_step_split
  from tnt_jax.train.step import ModelFunctions, token_losses
  from tnt_jax.train.trainer import check_model_context_split
  points = list(context_points())
  if max(point[1] for point in points) > 1 and use_gspmd_on_gpu():
    print("using the GSPMD partitioner (see tnt_jax/parallel/context.py use_gspmd_on_gpu)")
  variants = []
  for length, n, handoff, longest, implementation in points:
    row = dict(mode="context", config=FLAGS.context_config, devices=n, length=length,
               tokens_per_device=length // n, handoff=handoff, batch=1, longest=longest,
               implementation=implementation, device=jax.devices()[0].device_kind)
    config = context_model_config(FLAGS.context_config, handoff, implementation)
    try:
      check_model_context_split(length, n, config)
      model = ModelFunctions(LanguageModel(config, rngs=nnx.Rngs(0)))
      params = model.initial_params()
      row["params"] = sum(x.size for x in jax.tree.leaves(params))
      mesh = None
      if n > 1:
        grid = np.asarray(jax.devices()[:n]).reshape(1, 1, n)
        mesh = jax.sharding.Mesh(grid, mesh_lib.AXES)

      def make_batch(length=length):
        tokens = jax.random.randint(jax.random.key(0), (1, length), 0, 256)
        return {"inputs": tokens, "targets": tokens, "loss_mask": jnp.ones((1, length))}

      def make_args(model=model, make_batch=make_batch):
        # built again right before timing, so no other variant's arrays sit in GPU memory
        return model.initial_params(), make_batch()

      def loss(params, batch, model=model, mesh=mesh):
        s, c = token_losses(model, params, batch, mesh=mesh)
        return s / c

      lowered = jax.jit(jax.grad(loss)).lower(params, make_batch())
      del params
      variants.append((row, lowered, make_args, lm_train_flops(config, 1, length)))
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      variants.append((row, None, None, None))

  def compile_one(lowered):
    start = time.perf_counter()
    return lowered.compile(), time.perf_counter() - start

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(FLAGS.compile_threads) as pool:
    futures = [pool.submit(compile_one, v[1]) if v[1] is not None else None for v in variants]
  print(f"compiled {len(variants)} variants in {time.perf_counter() - start:.0f} s "
        f"({FLAGS.compile_threads} threads)", flush=True)

  single, longest_failed = {}, False
  for (row, _, make_args, flop_count), future in zip(variants, futures):
    if future is not None and longest_failed and row["longest"]:
      row["error"] = "skipped: a shorter --longest_lengths entry failed"
    elif future is not None:
      try:
        compiled, row["compile_s"] = future.result()
        args = make_args()
        before = device_peak_bytes(row["devices"] - 1)
        time_compiled(compiled, args, flop_count, peak * row["devices"], row)
        measured = device_peak_bytes(row["devices"] - 1)
        if measured is not None:
          # The allocator's peak cannot be reset: a peak that did not grow is only a bound.
          row.update(measured_peak_gb=measured / 1e9,
                     measured_peak_is_bound=before is not None and measured <= before)
        if FLAGS.profile and row["devices"] > 1:
          profile_start = time.perf_counter()
          split = profile_step_split(compiled, args,
                                     max_devices=FLAGS.profile_devices or None)
          row["profile_s"] = time.perf_counter() - profile_start   # trace + parse: slow at 8 GPUs
          if split.devices:   # CPU traces have no kernel events
            row.update(profiled_devices=split.devices, busy_ms=split.busy_ms,
                       comm_ms=split.comm_ms, exposed_comm_ms=split.exposed_comm_ms)
      except Exception as e:  # e.g. out of memory at the longest lengths
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if "error" in row:
      longest_failed = longest_failed or row["longest"]
      yield row
      continue
    n, length, implementation = row["devices"], row["length"], row["implementation"]
    if n == 1:
      single[implementation, length] = row["tokens_per_s"]
    else:
      if (implementation, length) in single:
        row["strong_efficiency"] = row["tokens_per_s"] / (n * single[implementation, length])
      if (implementation, length // n) in single:
        row["weak_efficiency"] = row["tokens_per_s"] / (
            n * single[implementation, length // n])
    yield row


def device_peak_bytes(index: int) -> int | None:
  """The largest GPU memory in use on jax.devices()[index] so far (None where the backend
  keeps no statistics, e.g. CPU). Context points run from fewer to more devices and from
  shorter to longer sequences, and the last device of an N-device mesh is first used by it,
  so this is the running point's own peak unless it did not grow (then only a bound)."""
  stats = jax.devices()[index].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def format_context_row(r) -> str:
  head = (f"context {r.get('implementation', 'xla'):>6} {r['devices']} GPU T={r['length']:>7} "
          f"{r['handoff']:>6}")
  if "error" in r:
    return f"{head}: FAILED {r['error']}"
  extra = "".join(f"  {name} {100 * r[key]:.0f}%" for name, key in (
      ("strong", "strong_efficiency"), ("weak", "weak_efficiency")) if key in r)
  if "comm_ms" in r:
    extra += (f"  NCCL {r['comm_ms']:.1f} ms ({100 * r['comm_ms'] / (1e3 * r['seconds']):.1f}%"
              f" of step, exposed {r['exposed_comm_ms']:.1f} ms)")
  measured = ""
  if "measured_peak_gb" in r:
    measured = (f" (measured peak {'<= ' if r['measured_peak_is_bound'] else ''}"
                f"{r['measured_peak_gb']:.2f} GB)")
  return (f"{head} ({r['tokens_per_device']} per GPU): {r['tokens_per_s'] / 1e3:8.1f}K tok/s "
          f"{r['seconds'] * 1e3:9.1f} ms  MFU {100 * r['mfu']:5.1f}%  mem "
          f"{r['memory_gb']:6.2f} GB{measured}  compile {r['compile_s']:.0f} s{extra}")


def format_decode_row(r) -> str:
  return (f"decode {r['kind']:>9} batch {r['batch']:>3} position {r['position']:>6}: "
          f"{r['step_ms']:7.2f} ms/step {r['tokens_per_s']:9.1f} tok/s  cache "
          f"{r['cache_mb']:8.1f} MiB  (prefill to here {r['prefill_s']:.1f} s incl. compile)")


def main(argv):
  del argv
  if FLAGS.plot:
    plot(FLAGS.plot, FLAGS.plot_prefix)
    return
  peak = measured_matmul_peak()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
        f"; measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
  sink = open(FLAGS.out, "a") if FLAGS.out else None
  modes = {"layer": run_layer_mode, "op": run_op_mode, "decode": run_decode_mode,
           "context": run_context_mode, "kernel": run_kernel_mode}
  formats = {"decode": format_decode_row, "context": format_context_row,
             "kernel": format_kernel_row}
  for row in modes[FLAGS.mode](peak):
    print(formats.get(FLAGS.mode, format_row)(row), flush=True)
    if sink:
      sink.write(json.dumps(dict(row, peak_tflops=peak / 1e12)) + "\n")
      sink.flush()


if __name__ == "__main__":
  app.run(main)
