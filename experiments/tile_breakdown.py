"""Where one chunk of the chunk-start tile path spends its time (kernels/chunk_start.py, or
kernels/chunk_start_mgpu.py for settings with tile_lowering=mosaic_gpu).

Times, for one chunk of every row (batch x heads rows, C = --chunk tokens): the tile kernel's
forward, the outer-sum GEMMs that reduce its outputs, the tile kernel's backward, the whole op
(one chunk) forward and forward+backward on the tile path, and the same on XLA's path. Uses the
benchmark's flags for batch, heads, expansion, rule and dtype:

    python -m experiments.tile_breakdown --chunk=2048 --head_dims=64 --kernel_blocks=tile=32,tile=16

With tile_lowering=mosaic_gpu the kernel pieces are its two passes (pass 2 with its XLA operand
preparation and split sums), and the backward is XLA's recompute, inside the whole-op rows.
"""

from __future__ import annotations

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments.benchmark import FLAGS, median_seconds, op_inputs
from tnt_jax.kernels import chunk_memory as cm
from tnt_jax.kernels import chunk_start as cs
from tnt_jax.kernels import chunk_start_mgpu as mg
from tnt_jax import profiling
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op

flags.DEFINE_integer("chunk", 2048, "tokens in the chunk (one chunk per row is timed)")
flags.DEFINE_integer("profile_top", 0, "also profile the whole-op pieces and print their this "
                     "many longest kernels (GPU: launches and ms per run)")


def _loss_grad(forward):
  """Gradient of a scalar of (outputs, final state) w.r.t. (q, k, v, gates, state)."""
  def loss(*args):
    out, final = forward(*args)
    return jnp.mean(out.astype(jnp.float32) ** 2) + sum(jnp.mean(x)
                                                         for x in jax.tree.leaves(final))
  return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def _pieces(config, blocks, head_dim, dtype):
  """(name, jitted fn, args) for the tile path's pieces on one chunk of every row."""
  b, h, c = FLAGS.batch, FLAGS.heads, FLAGS.chunk
  q, k, v, gates, state, _ = op_inputs(config, b, c, h, head_dim, dtype)
  acc = jnp.float32
  names = list(config.model.layer_shapes(head_dim))
  rows = lambda x: cm._rows(x, 1, c)[:, 0]                            # [R, C, d]
  qr, kr, vr = rows(q), rows(k), rows(v)
  coefs = cm.chunk_coefficients(gates, config, c, acc, c)
  c_w = coefs.end_x[:, 0]
  c_s = None if coefs.end_sx is None else coefs.end_sx[:, 0]
  weights = [w.astype(dtype) for w in cm._state_rows(state.weights, names, acc)]
  # Elsewhere than a GPU the kernel is interpreted: a check that this script runs, not a timing.
  gpu = jax.default_backend() == "gpu"
  driver = "chunk_loop" if gpu else "sequential_grid"
  static = cs._TileStatic(config, c_s is not None, cs.tile_size(c, blocks, driver), driver,
                          not gpu, blocks)
  kernel_impl = "pallas" if gpu else "pallas_interpret"
  op = lambda impl: (lambda *a: memory_op(*a[:4], a[4], {}, config, implementation=impl,
                                          kernel_blocks=blocks))
  whole = (q, k, v, gates, state)
  whole_op = [
      ("tile path fwd", jax.jit(op(kernel_impl)), whole),
      ("tile path fwd+bwd", jax.jit(_loss_grad(op(kernel_impl))), whole),
      ("xla path fwd", jax.jit(op("xla")), whole),
      ("xla path fwd+bwd", jax.jit(_loss_grad(op("xla"))), whole),
  ]
  if blocks.tile_lowering == "mosaic_gpu":
    settings = dict(activation=config.model.activation, tile=static.tile, interpret=not gpu)
    weights_t = [jnp.swapaxes(w, 1, 2) for w in weights]
    map_pass = jax.jit(lambda *a: mg.map_pass(*a, l2=config.loss == "l2", **settings))
    _, e = map_pass(weights_t, qr, kr, vr)
    reduce_pass = jax.jit(lambda *a: mg.reduce_pass(*a, **settings))
    return [("mosaic pass 1", map_pass, (weights_t, qr, kr, vr)),
            ("mosaic pass 2", reduce_pass, (weights, kr, e, c_w, c_s))] + whole_op
  tile_fwd = jax.jit(lambda *a: cs._tile_forward(static, *a))
  outputs = tile_fwd(weights, qr, kr, vr, c_w, c_s)
  keyed = cs.key_input_layers(config.model, len(names))

  def gemms(outputs, k):
    _, scaled_w, scaled_s, fed = outputs
    fed = iter(fed)
    inputs = [k if is_key else next(fed) for is_key in keyed]
    return ([cs._outer_sum(u, a, dtype) for u, a in zip(scaled_w, inputs)]
            + [cs._outer_sum(u, a, dtype) for u, a in zip(scaled_s, inputs)])

  tile_bwd = jax.jit(lambda *a: cs._tile_backward(static, *a))
  return [
      ("tile kernel fwd", tile_fwd, (weights, qr, kr, vr, c_w, c_s)),
      ("outer-sum GEMMs", jax.jit(gemms), (outputs, kr)),
      ("tile kernel bwd", tile_bwd, (weights, qr, kr, vr, c_w, c_s, outputs)),
  ] + whole_op


def main(_):
  dtype = jnp.dtype(FLAGS.dtype)
  print(f"device: {jax.devices()[0].device_kind}; one chunk of C={FLAGS.chunk} per row, "
        f"{FLAGS.batch * FLAGS.heads} rows, {dtype}")
  for head_dim in map(int, FLAGS.head_dims):
    for model_name in FLAGS.models:
      model = MemoryModel(model_name, expansion=FLAGS.expansion)
      config = MemoryConfig(model, UpdateRule(FLAGS.rule), "l2", "chunk_start", FLAGS.chunk)
      for spec in FLAGS.kernel_blocks:
        blocks = cm.KernelBlocks.from_spec(spec)
        if not blocks.tile:
          raise ValueError(f"--kernel_blocks={spec!r}: the tile kernel is opt-in; name a tile "
                           "(e.g. tile=32)")
        for name, fn, args in _pieces(config, blocks, head_dim, dtype):
          ms = 1e3 * median_seconds(fn, args, FLAGS.warmup, FLAGS.reps)
          print(f"{model_name:7s} d={head_dim:<4d} {spec:28s} {name:20s} {ms:9.3f} ms",
                flush=True)
          if FLAGS.profile_top and " path " in name:
            kernels = profiling.profile_kernels(fn, args, FLAGS.reps)
            ranked = sorted(kernels.items(), key=lambda item: -item[1][1])
            total = sum(ms for _, ms in kernels.values())
            print(f"    kernels: {len(kernels)} names, {total:.3f} ms summed")
            for kernel, (count, kernel_ms) in ranked[:FLAGS.profile_top]:
              print(f"    {kernel_ms:8.3f} ms  x{count:<4d} {kernel[:110]}")


if __name__ == "__main__":
  app.run(main)
