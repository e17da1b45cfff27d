"""The Mosaic GPU row kernels (kernels/chunk_rows_mgpu.py forward, chunk_rows_mgpu_reverse.py
reverse walk) against the token reference.

`MosaicRowsTest` compiles them on a Hopper GPU and is skipped elsewhere; `MosaicRowsInterpretTest`
runs the same kernel bodies under the Mosaic GPU interpreter on the CPU. The kernels take bf16
operands (wgmma), so the check is bfloat16 against the float32 reference: outputs, final states
and every gradient (the backward re-runs the forward per checkpoint group and walks the group
with the reverse kernel where it fits, else with the Pallas one), plus bfloat16 against the
Pallas row kernel, which rounds the same operands.
"""

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tests.helpers import assert_trees_rel_close, random_inputs
from tests.kernels.test_chunk_memory import (KernelTestCase, _inputs, _outputs_and_vjp,
                                             _seed, independent_row_case,
                                             row_op_and_reference)
from tnt_jax.kernels import chunk_memory, chunk_rows_mgpu, chunk_rows_mgpu_reverse
from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op
from tnt_jax.ops.tnt import LocalMemory, TNTConfig, tnt_op

MOSAIC = KernelBlocks(row_lowering="mosaic_gpu")
LINEAR = MemoryModel("linear")


def _config(rule="titans", read="cumulative", loss="l2", chunk=16, model=LINEAR):
  return MemoryConfig(model, UpdateRule(rule), loss, read, chunk)


class MosaicRowsTest(KernelTestCase):
  """Compiled on a Hopper GPU (skipped elsewhere); the subclass interprets the same body."""

  DTYPES = ("bfloat16",)
  DRIVERS = ("chunk_loop",)       # the reverse kernel's driver (the forward is Mosaic GPU's)

  def setUp(self):
    super().setUp()
    if not self.INTERPRET:
      reason = chunk_rows_mgpu.unsupported_reason(_config(), 64, jnp.bfloat16, 16,
                                                  compiled=True)
      if reason is not None:
        self.skipTest(reason)

  def _check(self, config, seed, blocks=MOSAIC, head_dim=64, length=40):
    super()._check(config, head_dim, "bfloat16", seed, blocks, length)

  def _before_check(self, config, head_dim, dtype, blocks):
    self.assertIsNone(chunk_memory.unsupported_reason(
        config, head_dim, getattr(jnp, dtype), driver="chunk_loop",
        interpret=bool(self.INTERPRET), blocks=blocks))

  @parameterized.product(rule=("gd", "titans"), read=("cumulative", "chunk_start"))
  def test_matches_reference(self, rule, read):
    # 40 tokens: two chunks of 16 and a partial one.
    self._check(_config(rule, read), _seed("mrows", rule, read))

  @parameterized.parameters((8, "dot", 45), (32, "l2", 70), (64, "l2", 130))
  def test_chunk_sizes_and_the_dot_loss(self, chunk, loss, length):
    # 8 is padded to 16 with identity tokens; 32 and 64 take wider swizzles. Titans' reverse
    # walk fits in shared memory at 16 only: the larger chunks test the Pallas reverse.
    self._check(_config(loss=loss, chunk=chunk), _seed("mrows-chunk", chunk, loss),
                length=length)

  @parameterized.parameters(("cumulative", "l2", 16), ("chunk_start", "dot", 16),
                            ("cumulative", "l2", 32), ("cumulative", "dot", 8))
  def test_reverse_walk_for_gd(self, read, loss, chunk):
    # The gd rule's reverse walk runs at chunks of 16 and 32 (and 8, padded to 16).
    config = _config("gd", read, loss, chunk)
    self.assertIsNone(chunk_rows_mgpu_reverse.unsupported_reason(
        config, 64, jnp.bfloat16, chunk_memory.row_chunk(chunk, "chunk_loop", MOSAIC),
        compiled=not self.INTERPRET))
    self._check(config, _seed("mrows-gd", read, loss, chunk), length=3 * chunk + 5)

  @parameterized.parameters(1, 2)
  def test_backward_from_states_saved_every_few_chunks(self, rerun_groups):
    # 8 chunks in groups of 3: the backward re-runs the kernel from saved states, the two
    # whole groups one at a time or both in one launch (their rows stacked).
    self._check(_config(), _seed("mrows-save"),
                KernelBlocks(row_lowering="mosaic_gpu", save_every=3, rerun_groups=rerun_groups),
                length=7 * 16 + 5)

  def test_pallas_reverse_after_the_mosaic_forward(self):
    self._check(_config(), _seed("mrows-pallas-reverse"),
                KernelBlocks(row_lowering="mosaic_gpu", reverse_lowering="pallas"))

  def test_xla_backward(self):
    self._check(_config("gd"), _seed("mrows-xla"),
                KernelBlocks(row_lowering="mosaic_gpu", backward="xla"))

  def test_head_dim_128(self):
    self._check(_config("gd"), _seed("mrows128"), head_dim=128)

  def test_agrees_with_the_pallas_row_kernel(self):
    """The same operand roundings: they differ by accumulation order only."""
    config = _config()
    args = _inputs(config, 64, jnp.bfloat16, 31, 70)
    run = lambda blocks: kernel_memory(*args, config, driver="chunk_loop",
                                       interpret=self.INTERPRET, blocks=blocks)
    assert_trees_rel_close(self, run(MOSAIC), run(KernelBlocks(layout="features")), 1e-2,
                           "mosaic vs pallas rows")

  def test_memory_op_routes_to_the_mosaic_kernel(self):
    config = _config()
    q, k, v, g, s = _inputs(config, 64, jnp.bfloat16, 5)
    calls = []
    real = chunk_rows_mgpu.linear_rows_forward

    def spy(*args, **kwargs):
      calls.append(args[0].shape)
      return real(*args, **kwargs)

    self.enter_context(absltest.mock.patch.object(chunk_rows_mgpu, "linear_rows_forward", spy))
    memory_op(q, k, v, g, s, {}, config, kernel_blocks=MOSAIC,
              implementation="pallas_interpret" if self.INTERPRET else "pallas")
    self.assertEqual(calls, [(2, 3, 64, 16)])    # 2 rows, 3 chunks, [d, C] features


  @parameterized.product(rule=("gd", "titans"), read=("cumulative", "chunk_start"))
  def test_reverse_walk_on_independent_coefficients(self, rule, read):
    """The row op with every coefficient drawn on its own (not from gates, which tie them):
    each coefficient's gradient, and q, k, v's and the state's, against the float32 scan."""
    config = _config(rule, read)
    args, fields = independent_row_case(config, "features", jnp.bfloat16,
                                        _seed("mrows-coefs", rule, read))
    kernel, reference = row_op_and_reference(
        config, fields, driver="chunk_loop", interpret=self.INTERPRET,
        blocks=KernelBlocks(row_lowering="mosaic_gpu", save_every=2, layout="features"))
    got = _outputs_and_vjp(kernel, args, 3)
    want = _outputs_and_vjp(reference, args, 3)
    assert_trees_rel_close(self, got, want, 2e-2, f"{rule}/{read}: ")

  def test_backward_runs_the_mosaic_reverse_walk(self):
    config = _config()
    q, k, v, g, s = _inputs(config, 64, jnp.bfloat16, 7, 40)
    calls = []
    real = chunk_rows_mgpu_reverse.linear_rows_reverse

    def spy(*args, **kwargs):
      calls.append((args[0].shape, len(args[5])))
      return real(*args, **kwargs)

    self.enter_context(absltest.mock.patch.object(chunk_rows_mgpu_reverse,
                                                  "linear_rows_reverse", spy))
    every_chunk = KernelBlocks(row_lowering="mosaic_gpu", save_every=1)
    loss = lambda q: jnp.sum(kernel_memory(q, k, v, g, s, config, driver="chunk_loop",
                                           interpret=self.INTERPRET, blocks=every_chunk)[0])
    jax.grad(loss)(q)
    self.assertEqual(calls, [((2, 3, 64, 16), 2)])    # rows, chunks, [d, C]; W and S saved

  @parameterized.named_parameters(("mlp", "mlp", 64), ("titans_d128", "linear", 128))
  def test_ops_mosaic_refuses_run_on_the_pallas_row_kernel(self, model, head_dim):
    # A 3-layer mlp: the Mosaic GPU mlp row kernel takes 2-layer ones.
    config = _config(model=MemoryModel("mlp", depth=3, expansion=1.0) if model == "mlp"
                     else LINEAR)
    calls = []
    real = chunk_rows_mgpu.linear_rows_forward
    spy = lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw)
    self.enter_context(absltest.mock.patch.object(chunk_rows_mgpu, "linear_rows_forward", spy))
    self._check(config, _seed("mrows-pallas", model), head_dim=head_dim)
    self.assertEqual(calls, [])

  def test_tnt_memory_on_the_mosaic_kernels(self):
    """A whole TNT memory of linear memories (global chunk-start 32, local cumulative 16 over
    shards of 32, Q-K projection) with both memories on the Mosaic GPU row kernel, in bf16,
    against the float32 token reference: outputs, the global state, every gradient."""
    glob = _config("titans", "chunk_start", chunk=32)
    local = LocalMemory(_config("titans"), shard_length=32)
    config = TNTConfig(glob, (local,), qk_projection=True)
    key = jax.random.key(_seed("mrows-tnt"))
    q, k, v, g0, state, _ = random_inputs(glob, key, batch=1, length=70, heads=2, head_dim=64)
    *_, g1, local_state, _ = random_inputs(local.memory, jax.random.fold_in(key, 1), batch=1,
                                           length=70, heads=2, head_dim=64)
    init = jax.tree.map(lambda w: w[0], local_state.weights)
    bf16 = lambda x: x.astype(jnp.bfloat16)
    args = (bf16(q), bf16(k), bf16(v), jax.tree.map(bf16, (g0, g1)), state, (init,))
    ref_args = jax.tree.map(lambda x: x.astype(jnp.float32), args)
    forwards, reverses = [], []
    for module, name, calls in ((chunk_rows_mgpu, "linear_rows_forward", forwards),
                                (chunk_rows_mgpu_reverse, "linear_rows_reverse", reverses)):
      real = getattr(module, name)
      spy = lambda *a, real=real, calls=calls, **kw: calls.append(a[0].shape) or real(*a, **kw)
      self.enter_context(absltest.mock.patch.object(module, name, spy))
    run = lambda impl, blocks, a: jax.jit(lambda a: _outputs_and_vjp(
        lambda *x: tnt_op(*x, ({}, {}), config, implementation=impl, kernel_blocks=blocks),
        a, 3))(a)
    got = run("pallas_interpret" if self.INTERPRET else "pallas", MOSAIC, args)
    with jax.default_matmul_precision("highest"):
      want = run("reference", None, ref_args)
    assert_trees_rel_close(self, got, want, 2e-2, "tnt: ")
    # rows = batch x shards x heads, [d, C]: the global (3 chunks of 32) and the local (3
    # shards of 2 chunks) forwards, then the backward's re-runs of checkpoint groups; the
    # reverse walk for the local (Titans at 32 does not fit it).
    self.assertContainsSubset({(2, 3, 64, 32), (6, 2, 64, 16)}, set(forwards))
    self.assertEqual(set(reverses), {(6, 2, 64, 16)})


class MosaicRowsInterpretTest(MosaicRowsTest):
  INTERPRET = True


class MosaicRowsRulesTest(parameterized.TestCase):
  """Which ops the Mosaic GPU row kernel takes (no kernel runs)."""

  def _reason(self, config, head_dim=64, dtype=jnp.bfloat16, interpret=True):
    """Why the Mosaic GPU row kernel does not take this op (the Pallas row kernel then runs)."""
    return chunk_memory.rows_blocks(config, head_dim, dtype, driver="chunk_loop",
                                    interpret=interpret, blocks=MOSAIC)[1]

  def test_the_pallas_row_kernel_takes_what_mosaic_refuses(self):
    mlp = _config(model=MemoryModel("mlp", depth=3, expansion=1.0))
    for config, head_dim in ((mlp, 64), (_config(), 128)):
      blocks, reason = chunk_memory.rows_blocks(config, head_dim, jnp.bfloat16,
                                                driver="chunk_loop", interpret=True,
                                                blocks=KernelBlocks(row_lowering="mosaic_gpu",
                                                                    reverse_lowering="mosaic_gpu",
                                                                    save_every=2))
      self.assertIsNotNone(reason)
      self.assertEqual(blocks, KernelBlocks(save_every=2, row_lowering="pallas"))
      self.assertIsNone(chunk_memory.unsupported_reason(
          config, head_dim, jnp.bfloat16, driver="chunk_loop", interpret=True, blocks=MOSAIC))
    self.assertEqual(chunk_memory.rows_blocks(_config(), 64, jnp.bfloat16, driver="chunk_loop",
                                              interpret=True, blocks=MOSAIC), (MOSAIC, None))
    # Compiled, neither kernel takes a cumulative read of 100 (padded to 128) tokens: xla runs.
    self.assertIn("max_chunk_activations", chunk_memory.unsupported_reason(
        _config(chunk=100), 64, jnp.bfloat16, driver="chunk_loop", interpret=False,
        blocks=MOSAIC))

  def test_auto_picks_mosaic_where_it_was_measured_faster(self):
    """row_lowering="auto" (the default) on a simulated H100 and A100 (an abstract device, as
    tnt_jax/platform.py reads it): Mosaic GPU for a linear memory's cumulative read where that
    kernel takes the op, the Pallas row kernel elsewhere, with no reason reported."""
    def lowering(config, device_kind, dtype=jnp.bfloat16, interpret=False, **blocks):
      device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None,
                                           platform="gpu")
      mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
      with jax.sharding.use_abstract_mesh(mesh):
        chosen, reason = chunk_memory.rows_blocks(config, 64, dtype, driver="chunk_loop",
                                                  interpret=interpret,
                                                  blocks=KernelBlocks(**blocks))
      self.assertIsNone(reason)
      return chosen.row_lowering

    h100, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
    self.assertEqual(KernelBlocks().row_lowering, "auto")
    self.assertEqual(lowering(_config(), h100), "mosaic_gpu")
    self.assertEqual(lowering(_config("gd"), h100), "mosaic_gpu")
    self.assertEqual(lowering(_config("gd", "chunk_start"), h100), "pallas")
    self.assertEqual(lowering(_config(model=MemoryModel("mlp", expansion=4.0)), h100),
                     "mosaic_gpu")
    self.assertEqual(lowering(_config("gd", "chunk_start", model=MemoryModel("mlp")), h100),
                     "mosaic_gpu")
    self.assertEqual(lowering(_config(model=MemoryModel("mlp", depth=3)), h100), "pallas")
    self.assertEqual(lowering(_config(model=MemoryModel("swiglu")), h100), "pallas")
    self.assertEqual(lowering(_config(), h100, dtype=jnp.float32), "pallas")   # Mosaic refuses
    self.assertEqual(lowering(_config(), h100, layout="tokens"), "pallas")
    self.assertEqual(lowering(_config(), h100, interpret=True), "pallas")
    self.assertEqual(lowering(_config(), a100), "pallas")
    if jax.default_backend() == "cpu":    # no abstract device: this host's platform decides
      self.assertEqual(chunk_memory.rows_blocks(
          _config(), 64, jnp.bfloat16, driver="chunk_loop", interpret=False,
          blocks=KernelBlocks())[0].row_lowering, "pallas")

  def test_supported(self):
    self.assertIsNone(self._reason(_config()))
    self.assertIsNone(self._reason(_config("gd", "chunk_start", "dot", chunk=4)))
    self.assertIsNone(self._reason(_config("gd"), head_dim=128))

  def test_refusals_name_the_value(self):
    swiglu = MemoryModel("swiglu", expansion=1.0)
    self.assertIn("kind='swiglu'", self._reason(_config(model=swiglu)))
    self.assertIn("dtype=float32", self._reason(_config(), dtype=jnp.float32))
    self.assertIn("head_dim=32", self._reason(_config(), head_dim=32))
    self.assertIn("chunk=128", self._reason(_config(chunk=100)))
    # Titans at d 128: W and S in float32 and bf16 are 192 KiB of shared memory.
    self.assertIn("shared memory", self._reason(_config(), head_dim=128))
    if jax.default_backend() != "gpu":
      self.assertIn("Mosaic GPU kernels run on NVIDIA Hopper GPUs",
                    self._reason(_config(), interpret=False))

  def test_reverse_walk_refusals_name_the_value(self):
    reason = lambda config, head_dim=64, chunk=16: chunk_rows_mgpu_reverse.unsupported_reason(
        config, head_dim, jnp.bfloat16, chunk, compiled=False)
    self.assertIsNone(reason(_config()))
    self.assertIsNone(reason(_config("gd", chunk=32), chunk=32))
    # Titans' state and cotangent (float32 + bf16, W and S) leave no room at 32 or d 128.
    self.assertIn("chunk=32", reason(_config(chunk=32), chunk=32))
    self.assertIn("shared memory", reason(_config(chunk=32), chunk=32))
    self.assertIn("head_dim=128", reason(_config("gd"), head_dim=128))
    self.assertIn("kind='mlp'", reason(_config(model=MemoryModel("mlp", depth=2))))
    self.assertIn("chunk=8", reason(_config(chunk=8), chunk=8))

  def test_blocks(self):
    self.assertEqual(KernelBlocks.from_spec("row_lowering=mosaic_gpu+save_every=2"),
                     KernelBlocks(row_lowering="mosaic_gpu", save_every=2))
    self.assertEqual(MOSAIC.resolved_layout("linear", "sequential_grid"), "features")
    self.assertEqual(chunk_memory.row_chunk(8, "sequential_grid", MOSAIC), 16)
    with self.assertRaisesRegex(ValueError, "row_lowering='mosaic_gpu' runs the \"features\""):
      KernelBlocks(row_lowering="mosaic_gpu", layout="tokens")
    with self.assertRaisesRegex(ValueError, "KernelBlocks.row_lowering='triton' is unknown"):
      KernelBlocks(row_lowering="triton")
    self.assertEqual(KernelBlocks.from_spec("row_lowering=mosaic_gpu+reverse_lowering=pallas"),
                     KernelBlocks(row_lowering="mosaic_gpu", reverse_lowering="pallas"))
    with self.assertRaisesRegex(ValueError, "reverse_lowering='mosaic_gpu' walks the states"):
      KernelBlocks(reverse_lowering="mosaic_gpu")
    with self.assertRaisesRegex(ValueError, "reverse_lowering='cuda' is unknown"):
      KernelBlocks(reverse_lowering="cuda")


if __name__ == "__main__":
  absltest.main()
