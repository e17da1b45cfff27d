"""The memory layer: presets run fwd+bwd under jit, parameter counts, fast path == reference,
causality, and the config rules."""

import dataclasses
from unittest import mock

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers import assert_trees_rel_close, rel_err
from tnt_jax.kernels import chunk_memory
from tnt_jax.kernels.chunk_memory import KernelBlocks
from tnt_jax.layers import (PRESETS, LaCTLayerConfig, MemoryLayer, TitansLayerConfig,
                            TNTLayerConfig, TTTLayerConfig, count_params, preset)
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.tnt import LocalMemory, TNTConfig

D_MODEL, HEADS = 32, 2          # head_dim 16
SMALL = {"titans": {"chunk_size": 4},
         "ttt_linear": {"chunk_size": 4},
         "ttt_mlp": {"chunk_size": 4},
         "lact": {"chunk_size": 8},
         "lact_hybrid": {"chunk_size": 8},   # shared_window = chunk = 8
         "tnt": {"global_chunk": 8, "local_chunks": (2, 4), "shard_lengths": 8}}

# Hand counts at d_model 32, 2 heads of 16. Shared by every kind: q, k, v, gate and output
# projections 5 * 32 * 32, three depthwise convs 3 * 4 * 32, the output norm scale 32.
SHARED = 5 * 32 * 32 + 3 * 4 * 32 + 32
GATES = lambda n: n * 2 * (32 + 1)                # n gates per head, each with a bias
MLP_W = 2 * (64 * 16 + 16 * 64)                    # hidden 4 * 16 = 64, two heads
HAND_COUNTS = {
    "titans": SHARED + GATES(3) + MLP_W,
    "ttt_linear": SHARED + GATES(1) + 2 * 16 * (16 + 1) + 2 * 2 * 16,
    "ttt_mlp": SHARED + GATES(1) + 2 * (64 * 17 + 16 * 65) + 2 * 2 * 16,
    "lact": SHARED + GATES(1) + 2 * 3 * 16 * 16,   # SwiGLU, hidden 16: w1, w3, w2
    "tnt": SHARED + 3 * (GATES(3) + MLP_W),        # one global + two locals
    # + the shared attention's q, k and output RMSNorm scales, 2 heads x 16 each
    "lact_hybrid": SHARED + GATES(1) + 2 * 3 * 16 * 16 + 3 * 32,
}


def small_config(name, **overrides):
  return preset(name, d_model=D_MODEL, num_heads=HEADS, **{**SMALL[name], **overrides})


def apply(layer, x):
  """layer(x) under one jit (eager nnx calls dispatch op by op: slow to run on CPU)."""
  graphdef, state = nnx.split(layer)
  return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def loss_fn(graphdef, params, rest, x):
  layer = nnx.merge(graphdef, params, rest)
  return jnp.mean(jnp.square(layer(x).astype(jnp.float32)))


class PresetTest(parameterized.TestCase):

  @parameterized.parameters(*PRESETS)
  def test_forward_backward_under_jit_and_param_count(self, name):
    config = small_config(name)
    layer = MemoryLayer(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    self.assertEqual(count_params(layer), HAND_COUNTS[name])
    self.assertEqual(config.param_count(), HAND_COUNTS[name])
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (2, 19, D_MODEL))
    loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=1))(graphdef, params, rest, x)
    chex.assert_tree_all_finite((loss, grads))
    # Every parameter, down to each memory's W_init and gate bias, receives a gradient.
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
      self.assertGreater(float(jnp.abs(g).max()), 0.0, jax.tree_util.keystr(path))


class FastPathTest(parameterized.TestCase):
  """The whole layer with the chunkwise op == the layer with the token-level reference."""

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)

  def tearDown(self):
    jax.config.update("jax_enable_x64", False)
    super().tearDown()

  # Titans' memory is TNT's global and local memory here; the op tests cover every rule.
  @parameterized.parameters("ttt_mlp", "lact", "lact_hybrid", "tnt")
  def test_layer_matches_reference_float64(self, name):
    results = []
    for implementation in ("xla", "reference"):
      config = small_config(name, implementation=implementation)
      layer = MemoryLayer(config, rngs=nnx.Rngs(3), dtype=jnp.float64, param_dtype=jnp.float64)
      graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
      x = jax.random.normal(jax.random.key(4), (1, 13, D_MODEL), jnp.float64)
      out, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(1, 3)))(graphdef, params,
                                                                         rest, x)
      results.append((out, grads))
    (out, grads), (out_ref, grads_ref) = results
    assert_trees_rel_close(self, out, out_ref, 1e-6, f"{name} outputs")
    assert_trees_rel_close(self, grads, grads_ref, 1e-6, f"{name} grads")

  def test_affine_layer_matches_reference_float64(self):
    """A Titans layer with a linear memory on implementation="affine" (ops/affine.py)."""
    results = []
    for implementation in ("affine", "reference"):
      config = small_config("titans", model=MemoryModel("linear"), implementation=implementation)
      layer = MemoryLayer(config, rngs=nnx.Rngs(3), dtype=jnp.float64, param_dtype=jnp.float64)
      graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
      x = jax.random.normal(jax.random.key(4), (1, 13, D_MODEL), jnp.float64)
      results.append(jax.jit(jax.value_and_grad(loss_fn, argnums=(1, 3)))(graphdef, params,
                                                                          rest, x))
    (out, grads), (out_ref, grads_ref) = results
    assert_trees_rel_close(self, out, out_ref, 1e-6, "affine outputs")
    assert_trees_rel_close(self, grads, grads_ref, 1e-6, "affine grads")

  def test_bfloat16_close_to_float32(self):
    config = small_config("tnt")
    x = jax.random.normal(jax.random.key(6), (2, 24, D_MODEL))
    outs = [apply(MemoryLayer(config, rngs=nnx.Rngs(5), dtype=dtype), x)
            for dtype in (jnp.float32, jnp.bfloat16)]
    self.assertLess(rel_err(outs[1], outs[0]), 2e-2)


class SharedAttentionTest(absltest.TestCase):
  """LaCT's hybrid: the sliding-window attention over the memory's q, k, v == a literal
  per-token softmax over the window, written here from the definition (float64)."""

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  def test_shared_attention_matches_token_loop(self):
    window, length = 5, 13
    config = small_config("lact_hybrid", shared_window=window)
    layer = MemoryLayer(config, rngs=nnx.Rngs(21), dtype=jnp.float64, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(22), (2, length, D_MODEL), jnp.float64)
    q, k, v = layer.qkv(x)
    got = layer._shared_attention(q, k, v, None)

    def rotate(y, t):   # RoPE, rotate-half form, at position t
      half = y.shape[-1] // 2
      angle = t * 10000.0 ** (-np.arange(half) / half)
      y1, y2 = y[..., :half], y[..., half:]
      return np.concatenate([y1 * np.cos(angle) - y2 * np.sin(angle),
                             y2 * np.cos(angle) + y1 * np.sin(angle)], -1)

    def rms(y, scale):
      return y / np.sqrt(np.mean(y * y, -1, keepdims=True) + 1e-6) * scale

    q, k, v = (np.asarray(a) for a in (q, k, v))
    q_scale = np.asarray(layer.attention_q_norm.scale[...])
    k_scale = np.asarray(layer.attention_k_norm.scale[...])
    want = np.zeros_like(q)
    for t in range(length):
      visible = range(max(0, t - window + 1), t + 1)
      qt = rotate(rms(q[:, t], q_scale), t)                                   # [B, H, D]
      scores = np.stack([np.sum(qt * rotate(rms(k[:, j], k_scale), j), -1)
                         for j in visible], -1) / np.sqrt(q.shape[-1])        # [B, H, S]
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      want[:, t] = np.einsum("bhs,sbhd->bhd", probs, np.stack([v[:, j] for j in visible]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-12)

  def test_output_has_zero_gradient_wrt_the_future(self):
    layer = MemoryLayer(small_config("lact_hybrid"), rngs=nnx.Rngs(23))
    x = jax.random.normal(jax.random.key(24), (1, 19, D_MODEL))
    t = 9   # inside the second chunk; the window reaches back into the first
    graphdef, state = nnx.split(layer)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(nnx.merge(graphdef, state)(x)[:, t])))(x)
    self.assertEqual(float(jnp.abs(grad[:, t + 1:]).max()), 0.0)
    self.assertGreater(float(jnp.abs(grad[:, t - 1]).max()), 0.0)

  def test_bad_window_raises(self):
    with self.assertRaisesRegex(ValueError, "shared_window=0"):
      small_config("lact_hybrid", shared_window=0)


class StabilityTest(absltest.TestCase):

  def test_saturated_gates_on_repeated_tokens_stay_finite(self):
    """Identical keys make a chunk's gradients add up; the chunk_lr_budget ceiling keeps a large
    global chunk from diverging even when every gate is saturated."""
    config = TNTLayerConfig(d_model=D_MODEL, num_heads=HEADS, global_chunk=128, local_chunks=(8,),
                            shard_lengths=256, theta_bias=10.0, eta_bias=10.0)
    layer = MemoryLayer(config, rngs=nnx.Rngs(11))
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(12), (1, 1, D_MODEL)), (1, 1024, D_MODEL))
    chex.assert_tree_all_finite(apply(layer, x))
    tnt = layer.tnt
    # min(max_lr = 0.02, budget 0.25 * (1 - max_momentum 0.9) / C)
    self.assertAlmostEqual(config.theta_ceiling(tnt.global_memory), 0.025 / 128)
    self.assertAlmostEqual(config.theta_ceiling(tnt.local_memories[0].memory), 0.025 / 8)


class CausalityTest(absltest.TestCase):

  def test_prefix_gives_prefix_of_outputs(self):
    """Lengths that are not multiples of C_G, C_L or S_L: the last chunk and shard are short,
    and the outputs equal those of any longer sequence with the same prefix."""
    layer = MemoryLayer(small_config("tnt"), rngs=nnx.Rngs(7))
    x = jax.random.normal(jax.random.key(8), (1, 21, D_MODEL))
    t = 13   # inside the second global chunk, a local chunk and a local shard
    np.testing.assert_allclose(apply(layer, x[:, :t]), apply(layer, x)[:, :t], rtol=2e-5,
                               atol=2e-6)

  def test_output_has_zero_gradient_wrt_the_future(self):
    layer = MemoryLayer(small_config("tnt"), rngs=nnx.Rngs(9))
    x = jax.random.normal(jax.random.key(10), (1, 17, D_MODEL))
    t = 6
    graphdef, state = nnx.split(layer)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(nnx.merge(graphdef, state)(x)[:, t])))(x)
    self.assertEqual(float(jnp.abs(grad[:, t + 1:]).max()), 0.0)
    self.assertGreater(float(jnp.abs(grad[:, :t + 1]).max()), 0.0)


class ConfigRulesTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("heads_do_not_divide", lambda: TitansLayerConfig(d_model=30, num_heads=4),
       "d_model=30 is not a multiple of num_heads=4"),
      ("shard_not_multiple_of_chunk",
       lambda: TNTLayerConfig(d_model=32, num_heads=2, local_chunks=(8,), shard_lengths=12),
       "shard_length=12 must be a positive multiple of the local chunk_size=8"),
      ("global_chunk_not_nested",
       lambda: TNTLayerConfig(d_model=32, num_heads=2, global_chunk=48, local_chunks=(8,),
                              shard_lengths=32),
       "C_G=48 and local 0's shard length S_L=32 must be nested"),
      ("no_locals", lambda: TNTLayerConfig(d_model=32, num_heads=2, local_chunks=()),
       "needs at least one local memory"),
      ("shards_per_local", lambda: TNTLayerConfig(d_model=32, num_heads=2, local_chunks=(8, 16),
                                                  shard_lengths=(64,)),
       "must give one S_L per local chunk"),
      ("bad_max_lr", lambda: TitansLayerConfig(d_model=32, num_heads=2, max_lr=0.0),
       "max_lr=0.0 must be a finite number > 0"),
      ("bad_head_dim", lambda: TitansLayerConfig(d_model=32, num_heads=2, head_dim=0),
       "head_dim=0 must be an integer >= 1"),
      ("bad_ttt_model", lambda: TTTLayerConfig(d_model=32, num_heads=2, model_kind="swiglu"),
       "TTT model_kind='swiglu'"),
      ("bad_preset", lambda: preset("mamba", d_model=32, num_heads=2),
       "layer preset='mamba' is unknown"),
      ("bad_implementation", lambda: LaCTLayerConfig(d_model=32, num_heads=2,
                                                     implementation="cuda"),
       "implementation='cuda' is unknown"),
      ("bad_kernel_blocks_value", lambda: TitansLayerConfig(d_model=32, num_heads=2,
                                                            kernel_blocks="tile=3"),
       "KernelBlocks.tile=3 must be 0 (off) or a power of 2"),
      ("bad_kernel_blocks_field", lambda: TitansLayerConfig(d_model=32, num_heads=2,
                                                            kernel_blocks="tiles=32"),
       "KernelBlocks spec 'tiles=32': 'tiles=32' must be field=value with field in"),
  )
  def test_bad_config_raises(self, make, message):
    with self.assertRaisesRegex(ValueError, message.replace("(", r"\(").replace(")", r"\)")):
      make()

  def test_kernel_blocks_reach_the_kernel(self):
    """The layer's kernel_blocks string is what every memory's kernel launch gets, forward and
    streaming prefill alike."""
    seen = []
    real = chunk_memory.kernel_memory

    def spy(*args, blocks, **kwargs):
      seen.append(blocks)
      return real(*args, blocks=blocks, **kwargs)

    config = small_config("titans", implementation="pallas_interpret",
                          kernel_blocks="save_every=2+num_stages=2")
    self.assertEqual(config.blocks, KernelBlocks(save_every=2, num_stages=2))
    layer = MemoryLayer(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 8, D_MODEL))
    with mock.patch.object(chunk_memory, "kernel_memory", spy):
      jax.eval_shape(layer, x)
      jax.eval_shape(lambda x: layer.extend(x, layer.init_cache(1)), x)
    self.assertEqual(seen, [config.blocks] * 2)

  def test_bad_input_shape_raises_before_tracing(self):
    layer = MemoryLayer(small_config("titans"), rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, r"d_model=32\], got shape \(2, 5, 16\)"):
      layer(jnp.zeros((2, 5, 16)))

  def test_explicit_head_dim_and_custom_memories(self):
    local = LocalMemory(MemoryConfig(MemoryModel("linear"), UpdateRule("gd"), chunk_size=2), 8)
    tnt = TNTConfig(MemoryConfig(MemoryModel("swiglu", expansion=2.0), UpdateRule("gd"),
                                 read="chunk_start", chunk_size=8), (local,))
    config = TNTLayerConfig.from_memories(tnt, d_model=32, num_heads=3, head_dim=12)
    layer = MemoryLayer(config, rngs=nnx.Rngs(0))
    self.assertEqual(count_params(layer), config.param_count())
    out = jax.eval_shape(lambda x: layer(x), jax.ShapeDtypeStruct((1, 11, 32), jnp.float32))
    self.assertEqual(out.shape, (1, 11, 32))

  def test_stage_two_chunks_keep_every_parameter_shape(self):
    stage1 = small_config("tnt")
    for stage2 in (stage1.with_local_chunks((1, 1)),
                   TNTLayerConfig.from_memories(stage1.memory_config(), d_model=D_MODEL,
                                                num_heads=HEADS).with_local_chunks((1, 2))):
      self.assertEqual([m.memory.chunk_size for m in stage2.memory_config().local_memories][0],
                       1)
      shapes = lambda c: jax.tree.map(jnp.shape, nnx.state(
          nnx.eval_shape(lambda: MemoryLayer(c, rngs=nnx.Rngs(0))), nnx.Param))
      self.assertEqual(shapes(stage2), shapes(stage1))
    with self.assertRaisesRegex(ValueError, "one chunk per local memory"):
      TNTLayerConfig.from_memories(stage1.memory_config(), d_model=D_MODEL,
                                   num_heads=HEADS).with_local_chunks((1,))


if __name__ == "__main__":
  absltest.main()
