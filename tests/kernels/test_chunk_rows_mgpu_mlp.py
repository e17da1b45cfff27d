"""The Mosaic GPU row kernel of a 2-layer mlp memory (kernels/chunk_rows_mgpu_mlp.py: the hidden
units split over a cluster, one program per 64) and its reverse walk
(kernels/chunk_rows_mgpu_mlp_reverse.py, the same split) against the token reference.

`MosaicMlpRowsTest` compiles it on a Hopper GPU (the cluster exchange) and is skipped elsewhere;
`MosaicMlpRowsInterpretTest` runs the same per-slice code under the Mosaic GPU interpreter on the
CPU, one program per row walking its slices in turn (the interpreter has no cluster stores). The
kernel takes bf16 operands (wgmma): bfloat16 against the float32 reference (outputs, final
states, every gradient; the backward re-runs this forward per checkpoint group and walks the
group with the Mosaic GPU reverse walk where it fits, else the Pallas reverse kernel), and
against the kernel's own jnp reference, which rounds the same operands, at a tighter tolerance.
"""

import dataclasses

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp

from tests.helpers import assert_trees_rel_close
from tests.kernels.test_chunk_memory import (KernelTestCase, _inputs, _outputs_and_vjp, _seed,
                                             independent_row_case, row_op_and_reference)
from tnt_jax.kernels import (chunk_memory, chunk_rows_mgpu, chunk_rows_mgpu_mlp,
                             chunk_rows_mgpu_mlp_reverse, mgpu_launch)
from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory, kernel_memory_reference
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops.api import memory_op

MOSAIC = KernelBlocks(row_lowering="mosaic_gpu")


def _config(rule="titans", read="cumulative", loss="l2", chunk=16, expansion=2.0,
            activation="gelu", depth=2):
  model = MemoryModel("mlp", depth=depth, expansion=expansion, activation=activation)
  return MemoryConfig(model, UpdateRule(rule), loss, read, chunk)


class MosaicMlpRowsTest(KernelTestCase):
  """Compiled on a Hopper GPU (skipped elsewhere); the subclass interprets the same code."""

  DTYPES = ("bfloat16",)
  DRIVERS = ("chunk_loop",)

  def setUp(self):
    super().setUp()
    if not self.INTERPRET:
      reason = chunk_rows_mgpu_mlp.unsupported_reason(_config(), 64, jnp.bfloat16, 16,
                                                      compiled=True)
      if reason is not None:
        self.skipTest(reason)

  def _before_check(self, config, head_dim, dtype, blocks):
    self.assertIsNone(chunk_memory.rows_blocks(
        config, head_dim, getattr(jnp, dtype), driver="chunk_loop",
        interpret=bool(self.INTERPRET), blocks=blocks)[1])

  def _forward_spy(self):
    calls = []
    real = chunk_rows_mgpu_mlp.mlp_rows_forward

    def spy(*args, **kwargs):
      calls.append((args[0].shape, args[5][0].shape))
      return real(*args, **kwargs)

    self.enter_context(absltest.mock.patch.object(chunk_rows_mgpu_mlp, "mlp_rows_forward", spy))
    return calls

  @parameterized.named_parameters(
      # name, rule, read, loss, chunk, expansion (hidden / 64 = slices), activation, length
      ("titans_cumulative_4_slices", "titans", "cumulative", "l2", 16, 4.0, "gelu", 40),
      ("gd_chunk_start_2_slices", "gd", "chunk_start", "l2", 16, 2.0, "gelu", 40),
      ("titans_chunk_start_1_slice_dot", "titans", "chunk_start", "dot", 16, 1.0, "silu", 40),
      ("gd_cumulative_chunk_32_2_slices", "gd", "cumulative", "dot", 32, 2.0, "tanh", 70),
      # The walk's one slot of chunk inputs (the only op that needs it; the others fit two).
      ("gd_cumulative_chunk_32_4_slices", "gd", "cumulative", "l2", 32, 4.0, "gelu", 70),
      ("titans_cumulative_chunk_8_padded", "titans", "cumulative", "l2", 8, 2.0, "silu", 21))
  def test_matches_reference(self, rule, read, loss, chunk, expansion, activation, length):
    calls = self._forward_spy()
    config = _config(rule, read, loss, chunk, expansion, activation)
    self._check(config, 64, "bfloat16", _seed("mlp-rows", rule, read, chunk, expansion), MOSAIC,
                length)
    self.assertTrue(calls)

  @parameterized.parameters(1, 2)
  def test_backward_from_states_saved_every_few_chunks(self, rerun_groups):
    # 8 chunks in groups of 3: the backward re-runs the kernel from its saved (merged) states,
    # the two whole groups one at a time or both in one launch (their rows stacked).
    self._check(_config(), 64, "bfloat16", _seed("mlp-rows-save"),
                KernelBlocks(row_lowering="mosaic_gpu", save_every=3,
                             rerun_groups=rerun_groups), 7 * 16 + 5)

  @parameterized.parameters((2, 1, 10), (2, 2, 11), (3, 2, 8))
  def test_reruns_beside_the_walk(self, save_every, per_launch, num_chunks):
    # overlap_reruns: each launch walks one step of groups back while re-running the next
    # step's groups (stacked, per_launch a step) on rows of their own (mgpu_launch). 10 chunks
    # in groups of 2: the last group, then four steps, three of them in a scan (compiled, two a
    # turn of its loop, PIPELINE_UNROLL, then one left over); 11 in groups of 2 by 2: the last
    # group, one left over, then a scan of two steps; 8 in groups of 3 by 2: the last group,
    # then one step.
    launches = []
    real = mgpu_launch.launch

    def spy(parts, **kwargs):
      launches.append(tuple(part.rows for part in parts))
      return real(parts, **kwargs)

    self.enter_context(absltest.mock.patch.object(mgpu_launch, "launch", spy))
    blocks = KernelBlocks(row_lowering="mosaic_gpu", save_every=save_every,
                          rerun_groups=per_launch, overlap_reruns=True)
    self._check(_config(), 64, "bfloat16", _seed("mlp-rows-beside", save_every, per_launch),
                blocks, (num_chunks - 1) * 16 + 5)
    rows = launches[0][0]                          # the forward's, alone
    full = -(-num_chunks // save_every) - 1
    want = {(rows,), (rows, rows * per_launch)}
    if full % per_launch:
      want.add((rows, rows * (full % per_launch)))
    self.assertEqual(set(launches), want)

  @parameterized.parameters(("titans", "cumulative", 4.0), ("gd", "chunk_start", 2.0))
  def test_forward_agrees_with_its_jnp_reference(self, rule, read, expansion):
    """The same operand roundings as `_chunk_step` ("features"). Interpreted, both run the
    same float32 dots, but in another summation order, so now and then a float32 value one bit
    apart rounds to the neighbouring bf16 value: the states agree to 0 on most inputs and to
    4.9e-5, 3.1e-4 and 1.3e-3 on others (7 seeds measured, notes v26), under one bf16 step.
    Compiled, wgmma accumulates in another order than XLA's dots, so such roundings are common
    and the states differ by ~1e-3 (notes v17: the Pallas row kernel differs from the same
    reference as much)."""
    config = _config(rule, read, expansion=expansion)
    args = _inputs(config, 64, jnp.bfloat16, _seed("mlp-rows-jnp", rule, read), 70)
    out, state = kernel_memory(*args, config, driver="chunk_loop", interpret=self.INTERPRET,
                               blocks=MOSAIC)
    want_out, want_state = jax.jit(lambda a: kernel_memory_reference(*a, config))(args)
    assert_trees_rel_close(self, state, want_state, 4e-3 if self.INTERPRET else 1e-2, "state")
    assert_trees_rel_close(self, out.astype(jnp.float32), want_out.astype(jnp.float32), 8e-3,
                           "out")

  def _reverse_spy(self):
    calls = []
    real = chunk_rows_mgpu_mlp_reverse.mlp_rows_reverse

    def spy(*args, **kwargs):
      calls.append((args[0].shape, len(args[8])))
      return real(*args, **kwargs)

    self.enter_context(absltest.mock.patch.object(chunk_rows_mgpu_mlp_reverse,
                                                  "mlp_rows_reverse", spy))
    return calls

  @parameterized.named_parameters(
      # name, rule, read, loss, chunk, expansion, activation
      ("titans_cumulative_4_slices", "titans", "cumulative", "l2", 16, 4.0, "gelu"),
      ("gd_chunk_start_2_slices", "gd", "chunk_start", "l2", 16, 2.0, "gelu"),
      ("titans_chunk_start_1_slice_dot", "titans", "chunk_start", "dot", 16, 1.0, "silu"),
      ("gd_cumulative_chunk_32_dot", "gd", "cumulative", "dot", 32, 2.0, "tanh"),
      ("titans_cumulative_2_slices_silu", "titans", "cumulative", "l2", 16, 2.0, "silu"))
  def test_reverse_walk_on_independent_coefficients(self, rule, read, loss, chunk, expansion,
                                                    activation):
    """The row op with every coefficient drawn on its own (not from gates, which tie them),
    walked by the Mosaic GPU mlp reverse walk from states saved every 2 chunks: every gradient
    (each coefficient's, q, k, v's, the state's) against the vjp of the same chunk step in jnp
    with the same bf16 roundings (backward="xla"). Not against the float32 scan: with freely
    drawn coefficients and hidden 256 the bf16 forward alone moves dq by 3.5e-2 from it for one
    of these cases, the same with the Pallas reverse kernel and the XLA backward (measured);
    test_matches_reference covers the float32 reference with gate-derived coefficients."""
    config = _config(rule, read, loss, chunk, expansion, activation)
    args, fields = independent_row_case(config, "features", jnp.bfloat16,
                                        _seed("mlp-reverse", rule, read, chunk, expansion))
    calls = self._reverse_spy()
    run = lambda blocks: row_op_and_reference(config, fields, driver="chunk_loop",
                                              interpret=self.INTERPRET, blocks=blocks)
    kernel, _ = run(KernelBlocks(row_lowering="mosaic_gpu", save_every=2, layout="features"))
    same_roundings, _ = run(KernelBlocks(row_lowering="mosaic_gpu", backward="xla",
                                         layout="features"))
    got = jax.jit(lambda a: _outputs_and_vjp(kernel, a, 3))(args)
    want = jax.jit(lambda a: _outputs_and_vjp(same_roundings, a, 3))(args)
    assert_trees_rel_close(self, got[1], want[1], 1e-2, f"{rule}/{read} vs same roundings: ")
    # 2 rows of 3 chunks: the last group (1 chunk), then the first (2); every state leaf.
    leaves = 4 if rule == "titans" else 2
    self.assertEqual(calls, [((2, 1, 64, chunk), leaves), ((2, 2, 64, chunk), leaves)])

  def test_reverse_walk_agrees_with_the_pallas_reverse_kernel(self):
    """Both walks from the same Mosaic GPU forward: the same gradients up to bf16 rounding.
    (Hidden 128: the Triton compile of the Pallas reverse kernel at hidden 256 takes minutes.)"""
    config = _config(expansion=2.0)
    args = _inputs(config, 64, jnp.bfloat16, _seed("mlp-reverse-pallas"), 70)
    calls = self._reverse_spy()

    def grads(blocks):
      loss = lambda q, k, v, g, s: jnp.sum(kernel_memory(
          q, k, v, g, s, config, driver="chunk_loop", interpret=self.INTERPRET,
          blocks=blocks)[0].astype(jnp.float32) ** 2)
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)

    pallas = grads(KernelBlocks(row_lowering="mosaic_gpu", reverse_lowering="pallas"))
    self.assertEqual(calls, [])
    mosaic = grads(MOSAIC)
    self.assertTrue(calls)
    assert_trees_rel_close(self, mosaic, pallas, 2e-2, "mosaic vs pallas reverse")

  def test_memory_op_routes_to_the_mosaic_mlp_kernel(self):
    config = _config(expansion=4.0)
    q, k, v, g, s = _inputs(config, 64, jnp.bfloat16, 5)
    calls = self._forward_spy()
    memory_op(q, k, v, g, s, {}, config, kernel_blocks=MOSAIC,
              implementation="pallas_interpret" if self.INTERPRET else "pallas")
    # 2 rows, 3 chunks, [d, C] features; W1 [rows, hidden, d].
    self.assertEqual(calls, [((2, 3, 64, 16), (2, 256, 64))])


class MosaicMlpRowsInterpretTest(MosaicMlpRowsTest):
  INTERPRET = True


class MosaicMlpRowsRulesTest(parameterized.TestCase):
  """Which mlp ops the Mosaic GPU row kernel takes (no kernel runs)."""

  def _reason(self, config, head_dim=64, dtype=jnp.bfloat16, interpret=True):
    return chunk_memory.rows_blocks(config, head_dim, dtype, driver="chunk_loop",
                                    interpret=interpret, blocks=MOSAIC)[1]

  def test_supported(self):
    for expansion in (1.0, 2.0, 4.0):
      self.assertIsNone(self._reason(_config(expansion=expansion)))
    self.assertIsNone(self._reason(_config("gd", "chunk_start", "dot", chunk=32, expansion=4.0)))
    self.assertIsNone(self._reason(_config(chunk=4)))           # padded to 16

  def test_refusals_name_the_value(self):
    self.assertIn("depth=3", self._reason(_config(depth=3)))
    self.assertIn("hidden width 320", self._reason(_config(expansion=5.0)))
    self.assertIn("hidden width 96", self._reason(_config(expansion=1.5)))
    self.assertIn("hidden width 192", self._reason(_config(expansion=3.0)))
    self.assertIn("head_dim=128", self._reason(_config(), head_dim=128))
    self.assertIn("dtype=float32", self._reason(_config(), dtype=jnp.float32))
    self.assertIn("chunk=128", self._reason(_config(chunk=100)))
    # Titans with hidden 256 at chunks of 32: its blocks, inputs and exchange need > 227 KiB.
    self.assertIn("shared memory", self._reason(_config(chunk=32, expansion=4.0)))
    if jax.default_backend() != "gpu":
      self.assertIn("Mosaic GPU kernels run on NVIDIA Hopper GPUs",
                    self._reason(_config(), interpret=False))

  def test_the_backward_rules_apply(self):
    # gd with hidden 256 at chunks of 32 on a simulated H100 (an abstract device, as
    # tnt_jax/platform.py reads it): the Mosaic GPU reverse walk takes its backward, but where
    # the walk is the Pallas reverse kernel's, that kernel's compiled limits refuse the op (XLA
    # then runs it) even though the Mosaic GPU forward takes it.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    config = _config("gd", chunk=32, expansion=4.0)
    reason = lambda blocks: chunk_memory.unsupported_reason(
        config, 64, jnp.bfloat16, driver="chunk_loop", interpret=False, blocks=blocks)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=device)):
      self.assertIsNone(chunk_rows_mgpu_mlp.unsupported_reason(config, 64, jnp.bfloat16, 32,
                                                               compiled=True))
      self.assertIsNone(reason(MOSAIC))
      self.assertIn("max_chunk_activations",
                    reason(dataclasses.replace(MOSAIC, reverse_lowering="pallas")))

  def test_reverse_walk_rules(self):
    reason = lambda config, chunk=16: chunk_rows_mgpu_mlp_reverse.unsupported_reason(
        config, 64, jnp.bfloat16, chunk, compiled=False)
    for expansion in (1.0, 2.0, 4.0):
      self.assertIsNone(reason(_config(expansion=expansion)))
    self.assertIsNone(reason(_config("gd", chunk=32, expansion=2.0), 32))
    # Two slots of chunk inputs fit wherever the walk does: the exchange holds only the peers'
    # parts of dE (Titans with hidden 256 at C = 16 fitted one slot when it held all four).
    self.assertEqual(chunk_rows_mgpu_mlp_reverse.input_slots(64, 16, True, 4), 2)
    self.assertEqual(chunk_rows_mgpu_mlp_reverse.input_slots(64, 16, True, 2), 2)
    # gd with hidden 256 at C = 32: the forward saving for the walk and the walk (one slot) fit.
    self.assertEqual(chunk_rows_mgpu_mlp_reverse.input_slots(64, 32, False, 4), 1)
    self.assertIsNone(reason(_config("gd", chunk=32, expansion=4.0), 32))
    self.assertIn("shared memory", reason(_config(chunk=32, expansion=4.0), 32))
    self.assertIn("depth=3", reason(_config(depth=3)))
    with self.assertRaisesRegex(ValueError, "save_aux needs save_every=1"):
      config = _config()
      q, k, v = (jnp.zeros((1, 1, 64, 16), jnp.bfloat16),) * 3
      chunk_rows_mgpu_mlp.mlp_rows_forward(q, k, v, None, None, [], activation="gelu",
                                           l2=True, save_every=2, interpret=True,
                                           save_aux=True)
    with self.assertRaisesRegex(ValueError, "outputs=False is the backward's re-run"):
      chunk_rows_mgpu_mlp.mlp_rows_forward(q, k, v, None, None, [], activation="gelu",
                                           l2=True, save_every=1, interpret=True,
                                           outputs=False)

  def test_refused_ops_run_on_the_pallas_row_kernel(self):
    blocks, reason = chunk_memory.rows_blocks(_config(expansion=5.0), 64, jnp.bfloat16,
                                              driver="chunk_loop", interpret=True,
                                              blocks=KernelBlocks(row_lowering="mosaic_gpu"))
    self.assertIsNotNone(reason)
    self.assertEqual(blocks.row_lowering, "pallas")


if __name__ == "__main__":
  absltest.main()
