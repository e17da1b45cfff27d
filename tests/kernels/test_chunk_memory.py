"""The fused chunk-memory kernel against the token-level reference.

`ChunkMemoryKernelTest` compiles the kernel for the accelerator it runs on (GPU: Triton lowering,
TPU: Mosaic) and is skipped elsewhere; its subclasses interpret the same kernel body on the CPU
(generic interpret mode for both drivers, and the TPU interpreter for the TPU driver). Shapes are
the compiled kernel's (chunk 16, head dims 64 and 128, lengths not a multiple of the chunk).
"""

from unittest import mock
import zlib

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import assert_trees_rel_close, outputs_and_vjp, random_inputs, rel_err
from tnt_jax import platform
from tnt_jax.kernels import chunk_memory
from tnt_jax.kernels.chunk_memory import KernelBlocks, kernel_memory, kernel_memory_reference
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.ops import api
from tnt_jax.ops.api import memory_op
from tnt_jax.ops.tnt import LocalMemory, TNTConfig, tnt_op
from tnt_jax.parallel.context import use_gspmd_on_gpu

MODELS = {"linear": MemoryModel("linear"),
          "mlp": MemoryModel("mlp", depth=2, expansion=1.0, activation="gelu")}
RULE_READS = {"gd_cumulative": ("gd", "cumulative"), "titans_cumulative": ("titans", "cumulative"),
              "gd_chunk_start": ("gd", "chunk_start"),
              "titans_chunk_start": ("titans", "chunk_start")}
CHUNK, LENGTH = 16, 40                      # 2 whole chunks and a partial one
# Relative Frobenius tolerances against the reference at the same precision (bf16: against the
# float32 reference on the same bf16-rounded inputs).
TOLERANCE = {"float64": 1e-6, "float32": 1e-4, "bfloat16": 2e-2}


def _config(model, rule_read, loss="l2"):
  rule, read = RULE_READS[rule_read]
  return MemoryConfig(MODELS[model], UpdateRule(rule), loss, read, CHUNK)


def _inputs(config, head_dim, dtype, seed, length=LENGTH):
  args = random_inputs(config, jax.random.key(seed), batch=1, length=length, heads=2,
                       head_dim=head_dim, dtype=jnp.float32)
  q, k, v, gates, state, _ = args
  cast = lambda x: x.astype(dtype)
  return (cast(q), cast(k), cast(v), jax.tree.map(cast, gates),
          jax.tree.map(lambda x: x.astype(jnp.promote_types(dtype, jnp.float32)), state))


def _outputs_and_vjp(fn, args, seed):
  """fn(*args) and its vjp at a random cotangent drawn in float32 (then cast), so a bf16 run
  and its float32 reference see the same cotangent."""
  outputs, vjp = jax.vjp(fn, *args)
  leaves, treedef = jax.tree.flatten(outputs)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  cot = [jax.random.normal(key, x.shape, jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)
         for key, x in zip(keys, leaves)]
  return outputs, vjp(jax.tree.unflatten(treedef, cot))


def independent_row_case(config, layout, dtype, seed, rows=2, chunks=3, head_dim=64):
  """Inputs of the row-level op (`chunk_memory._kernel_rows`) with every gate coefficient drawn
  on its own, not derived from gates (which tie them together, so a wrong gradient of one can
  hide in the gates' sum). Returns (args, coef_fields): q, k, v [R, N, C, d] ("tokens") or
  [R, N, d, C] ("features") in `dtype`; coefficients and states float32+."""
  c, d = config.chunk_size, head_dim
  acc = jnp.promote_types(dtype, jnp.float32)
  key = iter(jax.random.split(jax.random.key(seed), 32))
  normal = lambda shape, scale=1.0: scale * jax.random.normal(next(key), shape, acc)
  token_shape = (rows, chunks, c, d) if layout == "tokens" else (rows, chunks, d, c)
  q, k, v = (normal(token_shape, 0.5).astype(dtype) for _ in range(3))
  per_token, scalar = (rows, chunks, c, 1), (rows, chunks, 1, 1)
  cumulative, momentum = config.read == "cumulative", config.rule.has_momentum
  fresh = dict(end_w0=1.0 + normal(scalar, 0.05), end_x=normal(per_token, 0.05))
  if cumulative:
    fresh.update(read_w0=1.0 + normal(per_token, 0.05), read_x=normal((rows, chunks, c, c), 0.05))
  if momentum:
    fresh.update(end_s0=normal(scalar, 0.3), end_ss0=0.9 + normal(scalar, 0.05),
                 end_sx=normal(per_token, 0.05))
    if cumulative:
      fresh["read_s0"] = normal(per_token, 0.3)
  coefs = chunk_memory.coefs_in_layout(chunk_memory.ChunkCoefs(
      **{f: fresh.get(f) for f in chunk_memory.ChunkCoefs._fields}), layout)
  fields = tuple(f for f in chunk_memory.ChunkCoefs._fields if getattr(coefs, f) is not None)
  model = config.model
  widths = [d] + [model.hidden_dim(d)] * (model.depth - 1) + [d] if model.kind == "mlp" else [d, d]
  weights = [normal((rows, widths[i + 1], widths[i]), 0.1) for i in range(len(widths) - 1)]
  state = weights + ([normal(w.shape, 0.1) for w in weights] if momentum else [])
  return (q, k, v, [getattr(coefs, f) for f in fields], state), fields


def row_op_and_reference(config, fields, **static_kw):
  """(the kernel's row op, the float32+ jnp scan of the same chunk step) as functions of
  (q, k, v, coefs, state), for a linear or mlp memory."""
  depth = 1 if config.model.kind == "linear" else config.model.depth
  static = chunk_memory._Static(config, fields, depth, config.rule.has_momentum, **static_kw)
  kernel = lambda *args: chunk_memory._kernel_rows(static, *args)

  def reference(q, k, v, coefs, state):
    up = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return chunk_memory._reference_rows(static, up(q), up(k), up(v), coefs, state)

  return kernel, reference


def tnt_case(length, head_dim, dtype):
  """A TNT memory (mlp global chunk_start 32 + an mlp local of shards 32 and a linear gd local
  with the dot loss of shards 48, Q-K projection) and tnt_op's arguments for it."""
  glob = MemoryConfig(MODELS["mlp"], UpdateRule("titans"), "l2", "chunk_start", 32)
  locals_ = (LocalMemory(_config("mlp", "titans_cumulative"), shard_length=32),
             LocalMemory(MemoryConfig(MODELS["linear"], UpdateRule("gd"), "dot",
                                      "cumulative", 16), shard_length=48))
  key = jax.random.key(5)
  q, k, v, g0, state, _ = random_inputs(glob, key, batch=1, length=length, heads=2,
                                        head_dim=head_dim, dtype=dtype)
  gates, inits = [g0], []
  for i, local in enumerate(locals_):
    _, _, _, g, s, _ = random_inputs(local.memory, jax.random.fold_in(key, i), batch=1,
                                     length=length, heads=2, head_dim=head_dim, dtype=dtype)
    gates.append(g)
    inits.append(jax.tree.map(lambda w: w[0], s.weights))
  args = (q, k, v, tuple(gates), state, tuple(inits), ({}, {}, {}))
  return TNTConfig(glob, locals_, qk_projection=True), args


def _seed(*names):
  return zlib.crc32("/".join(map(str, names)).encode()) % 100_000


class KernelTestCase(parameterized.TestCase):
  """A kernel compiled on the accelerator (skipped elsewhere) against the token reference;
  subclasses set INTERPRET to run it anywhere. No tests of its own."""

  INTERPRET = False
  DRIVERS = (None,)          # None: the platform's driver
  DTYPES = ("float32", "bfloat16")

  def setUp(self):
    super().setUp()
    if not self.INTERPRET and jax.default_backend() not in chunk_memory.PLATFORM_DRIVER:
      self.skipTest(f"no compiled Pallas kernel on {jax.default_backend()!r}")
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  def _interpret(self):
    """The kernel's `interpret` argument."""
    return self.INTERPRET

  def _before_check(self, config, head_dim, dtype, blocks):
    """A subclass's preconditions on the case (may skip it)."""

  def _kernel(self, config, driver, blocks=KernelBlocks()):
    return lambda q, k, v, g, s: kernel_memory(q, k, v, g, s, config, driver=driver,
                                               interpret=self._interpret(), blocks=blocks)

  def _check(self, config, head_dim, dtype, seed, blocks=KernelBlocks(), length=LENGTH):
    if dtype not in self.DTYPES:
      self.skipTest(f"{dtype} is not compiled")
    self._before_check(config, head_dim, dtype, blocks)
    args = _inputs(config, head_dim, getattr(jnp, dtype), seed, length)
    ref_dtype = jnp.float32 if dtype == "bfloat16" else getattr(jnp, dtype)
    ref_args = jax.tree.map(lambda x: x.astype(jnp.promote_types(ref_dtype, x.dtype)), args)
    reference = lambda q, k, v, g, s: memory_op(q, k, v, g, s, {}, config,
                                                implementation="reference")
    with jax.default_matmul_precision("highest"):    # a true-float32 reference on GPU too
      (ref_out, ref_state), ref_grads = jax.jit(
          lambda a: _outputs_and_vjp(reference, a, seed))(ref_args)
    tol = TOLERANCE[dtype]
    for driver in self.DRIVERS:
      (out, state), grads = jax.jit(
          lambda a: _outputs_and_vjp(self._kernel(config, driver, blocks), a, seed))(args)
      self.assertEqual(out.dtype, args[0].dtype)
      self.assertEqual(out.shape, args[0].shape)
      what = f"{driver}/{dtype}/"
      assert_trees_rel_close(self, out, ref_out, tol, what + "out")
      assert_trees_rel_close(self, state, ref_state, tol, what + "state")
      for name, g, r in zip(("q", "k", "v", "gates", "state"), grads, ref_grads):
        assert_trees_rel_close(self, g, r, tol, f"{what}d_{name}")


class ChunkMemoryKernelTest(KernelTestCase):
  """The row kernel, compiled on the accelerator; subclasses interpret it anywhere."""

  @parameterized.product(model=tuple(MODELS), rule_read=tuple(RULE_READS))
  def test_matches_reference_float32(self, model, rule_read):
    config = _config(model, rule_read)
    self._check(config, 64, "float32", _seed(model, rule_read))

  @parameterized.product(model=tuple(MODELS), rule_read=("titans_cumulative", "gd_chunk_start"))
  def test_head_dim_128(self, model, rule_read):
    # bfloat16: in float32 these states exceed the compiled kernel's on-chip budget.
    config = _config(model, rule_read)
    self._check(config, 128, "bfloat16", _seed(model, rule_read, 128))

  @parameterized.product(model=tuple(MODELS), rule_read=("gd_cumulative", "titans_chunk_start"))
  def test_matches_reference_bfloat16(self, model, rule_read):
    config = _config(model, rule_read)
    self._check(config, 64, "bfloat16", _seed(model, rule_read, "bf16"))

  @parameterized.parameters("linear", "mlp")
  def test_dot_loss_and_silu(self, model):
    memory = MemoryModel("mlp", expansion=1.0, activation="silu") if model == "mlp" else \
        MODELS["linear"]
    config = MemoryConfig(memory, UpdateRule("titans"), "dot", "cumulative", CHUNK)
    self._check(config, 64, "float32", _seed(model, "dot"))

  @parameterized.parameters((8, "mlp", "titans_cumulative"), (12, "linear", "gd_chunk_start"))
  def test_chunks_below_the_gpu_minimum_are_padded_exactly(self, chunk, model, rule_read):
    # The GPU driver pads each chunk to 16 tokens with identity gates (kernel_chunk).
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS[model], UpdateRule(rule), "l2", read, chunk)
    self._check(config, 64, self.DTYPES[0], _seed("padded", chunk), length=45)

  @parameterized.parameters(1, 3, 8, 20, None)
  def test_backward_from_states_saved_every_few_chunks(self, save_every):
    # 8 chunks (the last partial): groups of 3 leave a shorter last group; 8 and 20 re-run the
    # whole row from the initial state; None is the default, round(sqrt(8)) = 3.
    config = _config("mlp", "titans_cumulative")
    dtype = self.DTYPES[0]
    self._check(config, 64, dtype, _seed("save_every", save_every),
                blocks=KernelBlocks(save_every=save_every), length=7 * CHUNK + 5)

  def test_every_state_saved_where_the_budget_holds_them(self):
    # save_every None with a budget past every chunk's state: spacing 1 (the forward saves each
    # chunk-start state and, on Mosaic GPU, its compute-dtype copy; the backward re-runs none).
    config = _config("mlp", "titans_cumulative")
    self._check(config, 64, self.DTYPES[0], _seed("budget", 1),
                blocks=KernelBlocks(max_saved_bytes=1 << 40), length=7 * CHUNK + 5)

  @parameterized.parameters((2, 2, False), (2, 3, False), (3, 2, False), (2, 9, False),
                            (2, 1, True), (2, 3, True))
  def test_checkpoint_groups_re_run_together(self, save_every, per_launch, overlap):
    # 11 chunks in groups of save_every: the last (shorter) group alone, then the whole groups
    # per_launch to a launch, their rows stacked, and the whole groups left over in one smaller
    # launch (2, 3: a scan step of 3 groups and 2 left; 2, 9: at most the 5 whole groups).
    # overlap: the same re-runs, each a step ahead of the walk (after it here: these kernels
    # cannot share a launch).
    config = _config("mlp", "titans_cumulative")
    re_runs = []
    real = chunk_memory._rows_forward

    def spy(static, q, *args, outputs=True, **kwargs):
      if not outputs:
        re_runs.append(q.shape[:2])
      return real(static, q, *args, outputs=outputs, **kwargs)

    self.enter_context(absltest.mock.patch.object(chunk_memory, "_rows_forward", spy))
    self._check(config, 64, self.DTYPES[0], _seed("re-run", save_every, per_launch),
                blocks=KernelBlocks(save_every=save_every, rerun_groups=per_launch,
                                    overlap_reruns=overlap), length=10 * CHUNK + 5)
    rows = re_runs[0][0]                       # the last group's, re-run on its own
    full = -(-11 // save_every) - 1
    together = min(per_launch, full)
    want = {(rows, 11 - full * save_every), (rows * together, save_every)}
    if full % together:
      want.add((rows * (full % together), save_every))
    self.assertEqual(set(re_runs), want)

  @parameterized.parameters(
      ("titans_cumulative", "l2", None), ("gd_cumulative", "dot", None),
      ("titans_chunk_start", "dot", None), ("gd_chunk_start", "l2", None),
      ("titans_cumulative", "l2", 3))
  def test_state_streamed_in_hidden_slices(self, rule_read, loss, save_every):
    # hidden 128 in 4 slices of 32 (kernels/sliced_mlp.py); save_every 3 over 8 chunks also
    # re-runs groups from saved states.
    rule, read = RULE_READS[rule_read]
    memory = MemoryModel("mlp", depth=2, expansion=2.0, activation="gelu")
    config = MemoryConfig(memory, UpdateRule(rule), loss, read, CHUNK)
    length = LENGTH if save_every is None else 7 * CHUNK + 5
    self._check(config, 64, self.DTYPES[0], _seed("sliced", rule_read, loss, save_every),
                blocks=KernelBlocks(hidden_slice=32, save_every=save_every), length=length)

  def test_state_streamed_in_hidden_slices_head_dim_128(self):
    # A 512 KiB titans state (d 128, hidden 256): too big to carry, runs as 4 slices of 64.
    memory = MemoryModel("mlp", depth=2, expansion=2.0, activation="silu")
    config = MemoryConfig(memory, UpdateRule("titans"), "l2", "cumulative", CHUNK)
    dtype = "bfloat16" if "bfloat16" in self.DTYPES else self.DTYPES[0]
    self._check(config, 128, dtype, _seed("sliced", 128), blocks=KernelBlocks(hidden_slice=64))

  @parameterized.parameters(
      ("linear", "titans_cumulative", "l2", 64, CHUNK, None),
      ("mlp", "titans_cumulative", "l2", 64, CHUNK, 3),
      ("mlp", "gd_chunk_start", "dot", 64, CHUNK, None),
      ("mlp", "gd_cumulative", "l2", 64, 8, None),
      ("mlp", "titans_cumulative", "l2", 128, CHUNK, None))
  def test_feature_major_layout(self, model, rule_read, loss, head_dim, chunk, save_every):
    # KernelBlocks(layout="features"): the same step on [width, C] activations (so the feature
    # width is each matmul's M); groups of 3 over 8 chunks, and chunks padded from 8, included.
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS[model], UpdateRule(rule), loss, read, chunk)
    dtype = "bfloat16" if head_dim == 128 and "bfloat16" in self.DTYPES else self.DTYPES[0]
    length = 45 if save_every is None else 7 * CHUNK + 5
    self._check(config, head_dim, dtype, _seed("features", model, rule_read, head_dim, chunk),
                blocks=KernelBlocks(layout="features", save_every=save_every), length=length)

  @parameterized.parameters(("titans_cumulative", "l2", "bfloat16", "tokens"),
                            ("gd_chunk_start", "dot", "float32", "tokens"),
                            ("gd_cumulative", "l2", "float32", "features"))
  def test_swiglu(self, rule_read, loss, dtype, layout):
    # w2 [silu(w1 x) * (w3 x)]: two layers read the same input, so the graph is not a chain.
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MemoryModel("swiglu", expansion=1.0), UpdateRule(rule), loss, read,
                          CHUNK)
    dtype = dtype if dtype in self.DTYPES else self.DTYPES[0]
    self._check(config, 64, dtype, _seed("swiglu", rule_read, layout), length=45,
                blocks=KernelBlocks(layout=layout))

  @parameterized.parameters(
      ("titans_cumulative", "l2", 64, 4, None, None),
      ("gd_cumulative", "dot", 64, 2, "tokens", None),
      ("titans_chunk_start", "l2", 64, 2, None, 3),
      ("gd_chunk_start", "l2", 128, 8, "tokens", None),
      ("titans_cumulative", "l2", 128, 2, None, 1),
      ("gd_cumulative", "l2", 64, 4, None, None, "xla"))
  def test_linear_rows_split_by_output_feature(self, rule_read, loss, head_dim, split, layout,
                                               save_every, backward="fused"):
    # KernelBlocks(value_split=s): each (batch, head) row runs as s rows of head_dim / s output
    # features (chunk_memory._split_value_rows) that share one copy of q, k and the gates; their
    # gradients are summed over the s programs (and by autodiff in the "xla" backward).
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MODELS["linear"], UpdateRule(rule), loss, read, CHUNK)
    dtype = "bfloat16" if head_dim == 128 and "bfloat16" in self.DTYPES else self.DTYPES[0]
    length = 45 if save_every is None else 7 * CHUNK + 5
    self._check(config, head_dim, dtype, _seed("value_split", rule_read, head_dim, split),
                blocks=KernelBlocks(value_split=split, layout=layout, save_every=save_every,
                                    backward=backward),
                length=length)

  def test_head_dim_128_linear_float32_with_the_default_blocks(self):
    # Compiled on a GPU the default blocks split these rows (value_split auto), which lets a
    # float32 Titans state of d = 128 onto the kernel; interpreted, the rows stay whole.
    config = _config("linear", "titans_cumulative")
    dtype = "float32" if "float32" in self.DTYPES else self.DTYPES[0]
    self._check(config, 128, dtype, _seed("default_128_f32"))

  def test_saved_states_are_the_start_of_every_spacing_th_chunk(self):
    config = _config("linear", "titans_cumulative")
    args = _inputs(config, 64, getattr(jnp, self.DTYPES[0]), 4, 7 * CHUNK + 5)
    saved = {}

    def forwards(static, q, k, v, coefs, state):
      static = static._replace(driver=self.DRIVERS[-1] or chunk_memory.PLATFORM_DRIVER[
          jax.default_backend()], interpret=self._interpret())
      for every in (1, 3):
        out, final, saved[every] = chunk_memory._rows_forward(static, q, k, v, coefs, state,
                                                              save_every=every)
      return out, final

    chunk_memory._run_rows(forwards, *args, config)          # eager: saved holds arrays
    for every_chunk, every_third in zip(saved[1], saved[3]):
      self.assertEqual(every_third.shape[1], 3)              # chunks 0, 3, 6 of 8
      np.testing.assert_array_equal(np.asarray(every_third), np.asarray(every_chunk[:, ::3]))

  def test_memory_op_pallas_uses_the_kernel_or_falls_back_exactly(self):
    config = _config("mlp", "titans_cumulative")
    q, k, v, g, s = _inputs(config, 64, jnp.float32, 3)
    implementation = "pallas_interpret" if self.INTERPRET else "pallas"
    got = memory_op(q, k, v, g, s, {}, config, implementation=implementation)
    want = kernel_memory(q, k, v, g, s, config, interpret=self.INTERPRET)
    assert_trees_rel_close(self, got, want, 1e-7, "memory_op")


class ChunkMemoryKernelInterpretTest(ChunkMemoryKernelTest):
  """Both drivers interpreted on the CPU, float64 included (the ~1e-6 check)."""

  INTERPRET = True
  DRIVERS = chunk_memory.DRIVERS
  DTYPES = ("float64", "float32", "bfloat16")

  @parameterized.parameters(("titans_cumulative", "tokens"), ("gd_chunk_start", "features"))
  def test_swiglu_float64(self, rule_read, layout):
    rule, read = RULE_READS[rule_read]
    config = MemoryConfig(MemoryModel("swiglu", expansion=2.0), UpdateRule(rule), "l2", read,
                          CHUNK)
    self._check(config, 64, "float64", _seed("swiglu64", rule_read), length=45,
                blocks=KernelBlocks(layout=layout))

  @parameterized.product(model=tuple(MODELS), rule_read=tuple(RULE_READS))
  def test_matches_reference_float64(self, model, rule_read):
    config = _config(model, rule_read)
    self._check(config, 64, "float64", _seed(model, rule_read, "f64"))

  @parameterized.product(model=tuple(MODELS), rule_read=tuple(RULE_READS))
  def test_row_op_on_independent_coefficients_float64(self, model, rule_read):
    """Every coefficient's gradient of the fused backward, each coefficient drawn on its own."""
    config = _config(model, rule_read)
    layout = "features" if model == "linear" else "tokens"
    args, fields = independent_row_case(config, layout, jnp.float64,
                                        _seed("independent", model, rule_read))
    kernel, reference = row_op_and_reference(
        config, fields, driver="chunk_loop", interpret=True,
        blocks=KernelBlocks(layout=layout, save_every=2))
    got, want = _outputs_and_vjp(kernel, args, 2), _outputs_and_vjp(reference, args, 2)
    assert_trees_rel_close(self, got, want, 1e-6, f"{model}/{rule_read}: ")

  def test_version_1_backward_recomputing_in_jnp(self):
    config = _config("mlp", "titans_cumulative")
    args = _inputs(config, 64, jnp.float64, 12)
    run = lambda blocks: jax.jit(lambda a: _outputs_and_vjp(
        lambda q, k, v, g, s: kernel_memory(q, k, v, g, s, config, interpret=True,
                                            blocks=blocks), a, 1))(args)
    (_, fused_grads), (_, xla_grads) = run(KernelBlocks()), run(KernelBlocks(backward="xla"))
    assert_trees_rel_close(self, fused_grads, xla_grads, 1e-10, "fused vs xla backward")

  def test_jnp_reference_beside_the_kernel_is_exact(self):
    for model in MODELS:
      config = _config(model, "titans_cumulative")
      args = _inputs(config, 64, jnp.float64, 11)
      got = kernel_memory_reference(*args, config)
      want = memory_op(*args[:4], args[4], {}, config, implementation="reference")
      assert_trees_rel_close(self, got, want, 1e-10, f"{model}: jnp reference")

  def test_tnt_op_with_kernel_memories(self):
    """A TNT memory (global chunk_start + two locals with shard resets) through the kernel."""
    config, args = tnt_case(length=70, head_dim=64, dtype=jnp.float64)
    run = lambda impl: jax.jit(lambda a: outputs_and_vjp(
        lambda *x: tnt_op(*x, config, implementation=impl), a))(args)
    (out, st), grads = run("pallas_interpret")
    (ref_out, ref_st), ref_grads = run("reference")
    assert_trees_rel_close(self, out, ref_out, 1e-6, "out")
    assert_trees_rel_close(self, st, ref_st, 1e-6, "global state")
    for name, g, r in zip(("q", "k", "v", "gates", "state", "inits"), grads, ref_grads):
      assert_trees_rel_close(self, g, r, 1e-6, f"d_{name}")


class ChunkMemoryKernelTPUInterpretTest(ChunkMemoryKernelTest):
  """The TPU driver under the TPU interpreter (Mosaic block rules, sequential chunk axis)."""

  INTERPRET = True
  DRIVERS = ("sequential_grid",)
  DTYPES = ("float32",)

  def _interpret(self):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()


class KernelUnderAMeshTest(parameterized.TestCase):
  """Under a mesh (jax.set_mesh) the kernel runs in shard_map on each device's batch rows
  (XLA cannot partition a Pallas call; test_tpu_compile.py shows Mosaic TPU refusing it).
  On the 4 simulated CPU devices (tests/conftest.py), interpreted."""

  def test_per_device_rows_equal_the_unsplit_op(self):
    if jax.device_count() < 4:
      self.skipTest("needs 4 devices")
    config = _config("mlp", "titans_cumulative")
    base = _inputs(config, 64, jnp.float32, 21)
    # 4 distinct batch rows, so a row sent to the wrong device would show.
    args = jax.tree.map(lambda x: jnp.concatenate([x * (1 + 0.1 * i) for i in range(4)]), base)
    op = lambda impl: lambda a: _outputs_and_vjp(
        lambda *x: memory_op(*x, {}, config, implementation=impl), a, 3)
    want = jax.jit(op("xla"))(args)
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
      self.assertEqual(api.kernel_mesh_axes(), ("data", "fsdp"))
      self.assertIn("shard_map", str(jax.make_jaxpr(op("pallas_interpret"))(args)))
      got = jax.jit(op("pallas_interpret"))(args)
    assert_trees_rel_close(self, got, want, 1e-5, "outputs, state and gradients")

  def test_compiled_rows_over_gpus(self):
    """Compiled on two or more GPUs: the batch rows over a data mesh run the kernel per device
    (on Hopper the Mosaic GPU cluster kernels for this mlp with hidden 256) and equal both the
    unsplit kernel and the float32 reference (bf16 tolerance)."""
    gpus = jax.device_count() if jax.default_backend() == "gpu" else 0
    if gpus < 2:
      self.skipTest("needs two GPUs")
    if use_gspmd_on_gpu():   # as the trainer does: Shardy segfaulted compiling this (2 H200s)
      self.addCleanup(jax.config.update, "jax_use_shardy_partitioner", True)
    config = MemoryConfig(MemoryModel("mlp", expansion=4.0), UpdateRule("titans"), "l2",
                          "cumulative", 16)
    base = _inputs(config, 64, jnp.bfloat16, 23, length=16 * 5 + 3)
    args = jax.tree.map(lambda x: jnp.concatenate([x * (1 + 0.1 * i) for i in range(gpus)]),
                        base)
    op = lambda impl: lambda a: _outputs_and_vjp(
        lambda *x: memory_op(*x, {}, config, implementation=impl), a, 3)
    ref_args = jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), args)
    with jax.default_matmul_precision("highest"):
      want = jax.jit(op("reference"))(ref_args)
    unsplit = jax.jit(op("pallas"))(args)
    mesh = jax.make_mesh((gpus,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
      self.assertIn("shard_map", str(jax.make_jaxpr(op("pallas"))(args)))
      got = jax.jit(op("pallas"))(args)
    assert_trees_rel_close(self, got, unsplit, 1e-5, "rows over the GPUs against unsplit")
    assert_trees_rel_close(self, got, want, TOLERANCE["bfloat16"], "against the reference")

  def test_rows_that_do_not_split_run_the_xla_path(self):
    if jax.device_count() < 4:
      self.skipTest("needs 4 devices")
    config = _config("linear", "gd_cumulative")
    args = _inputs(config, 64, jnp.float32, 22)      # batch 1 over 4 devices
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
      fn = lambda a: memory_op(*a, {}, config, implementation="pallas_interpret")
      with self.assertLogs(level="WARNING") as logs:
        jaxpr = str(jax.make_jaxpr(fn)(args))
      got = jax.jit(fn)(args)
    self.assertIn("1 batch rows do not split over mesh axes ('data',)", "".join(logs.output))
    self.assertNotIn("pallas_call", jaxpr)
    want = memory_op(*args, {}, config, implementation="xla")
    assert_trees_rel_close(self, got, want, 1e-6, "fallback")


class CheckpointSpacingTest(parameterized.TestCase):
  """KernelBlocks.checkpoint_spacing: every chunk's state where the budget holds them (with
  their compute-dtype copies), else round(sqrt(N)); save_every overrides both."""

  def test_every_chunk_within_the_budget_else_sqrt(self):
    fits = KernelBlocks(max_saved_bytes=64 * (100 + 50))
    self.assertEqual(fits.checkpoint_spacing(64, 100, 50), 1)
    self.assertEqual(fits.checkpoint_spacing(64, 101, 50), 8)
    self.assertEqual(fits.checkpoint_spacing(65, 100, 50), 8)
    self.assertEqual(KernelBlocks(save_every=3, max_saved_bytes=1 << 40).checkpoint_spacing(
        64, 100, 50), 3)

  def test_default_budget_is_a_share_of_the_device_memory(self):
    gib = 1 << 30
    for limit, sharers, want in ((64 * gib, 1, 16 * gib), (64 * gib, 4, 4 * gib),
                                 (None, 1, None)):
      with mock.patch.object(chunk_memory, "target_memory_bytes", return_value=limit), \
          chunk_memory.saved_states_shared_by(sharers):
        self.assertEqual(chunk_memory.saved_states_budget(), want)
    with mock.patch.object(chunk_memory, "target_memory_bytes", return_value=16 * gib):
      # budget 4 GiB: 64 chunks of 32 MiB states + 16 MiB copies (3 GiB) fit; not 2 GiB
      state, copy = 32 << 20, 16 << 20
      self.assertEqual(KernelBlocks().checkpoint_spacing(64, state, copy), 1)
      with chunk_memory.saved_states_shared_by(2):
        self.assertEqual(KernelBlocks().checkpoint_spacing(64, state, copy), 8)
    with mock.patch.object(chunk_memory, "target_memory_bytes", return_value=None):
      self.assertEqual(KernelBlocks().checkpoint_spacing(64, 1, 1), 8)   # no limit: sqrt(N)

  def test_device_memory_read_under_a_mesh_of_this_hosts_devices(self):
    # A mesh of this host's devices sets an abstract device (the trainer's case): the limit is
    # still read from the local device; a target of another kind (TPU lowered here) has none.
    fake = mock.Mock(device_kind="NVIDIA H100 80GB HBM3")
    fake.memory_stats.return_value = {"bytes_limit": 60 << 30}
    here = jax.sharding.AbstractDevice(fake.device_kind, 132, "gpu")
    there = jax.sharding.AbstractDevice("TPU v5 lite", 1, "tpu")
    axes = dict(axis_sizes=(1,), axis_names=("data",))
    with mock.patch.object(platform.jax, "devices", return_value=[fake]):
      self.assertEqual(platform.target_memory_bytes(), 60 << 30)
      with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(**axes,
                                                                    abstract_device=here)):
        self.assertEqual(platform.target_memory_bytes(), 60 << 30)
      with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(**axes,
                                                                    abstract_device=there)):
        self.assertIsNone(platform.target_memory_bytes())

  def test_sharers_must_be_positive(self):
    with self.assertRaisesRegex(ValueError, "calls=0 must be an integer >= 1"):
      with chunk_memory.saved_states_shared_by(0):
        pass


class KernelErrorsTest(parameterized.TestCase):

  def test_unsupported_ops_raise_naming_the_reason(self):
    config = MemoryConfig(MemoryModel("swiglu"), UpdateRule("lact"), "l2", "chunk_start", 16)
    args = _inputs(config, 64, jnp.float32, 0)
    with self.assertRaisesRegex(ValueError, "rule='lact'"):
      kernel_memory(*args, config, interpret=True)
    ttt = MemoryConfig(MemoryModel("linear", bias=True, residual_norm=True), UpdateRule("gd"))
    self.assertIn("bias=True", chunk_memory.unsupported_reason(
        ttt, 64, jnp.float32, driver="chunk_loop", interpret=True))

  def test_compiled_shape_rules(self):
    reason = lambda config, d, dtype=jnp.float32: chunk_memory.unsupported_reason(
        config, d, dtype, driver="chunk_loop", interpret=False)
    self.assertIn("head_dim=60", reason(_config("linear", "gd_cumulative"), 60))
    self.assertIn("chunk_size=128 x widest layer 64 > KernelBlocks.max_chunk_activations=4096",
                  reason(MemoryConfig(MODELS["linear"], UpdateRule("gd"), chunk_size=128), 64))
    self.assertIn("dtype=float64", reason(_config("linear", "gd_cumulative"), 64, jnp.float64))
    big = MemoryConfig(MemoryModel("mlp", expansion=4.0), UpdateRule("titans"), chunk_size=16)
    self.assertIn("max_state_bytes", reason(big, 128))
    titans_128 = _config("linear", "titans_cumulative")
    whole = lambda config, d, dtype=jnp.float32: chunk_memory.unsupported_reason(
        config, d, dtype, driver="chunk_loop", interpret=False, blocks=KernelBlocks(value_split=1))
    self.assertIn("max_state_bytes / 4 for float32", whole(titans_128, 128))
    self.assertIsNone(whole(titans_128, 128, jnp.bfloat16))
    self.assertIsNone(reason(titans_128, 128))     # auto: split into rows of 32 features
    self.assertIsNone(reason(_config("mlp", "titans_cumulative"), 64))
    self.assertEqual(chunk_memory.kernel_chunk(8, "chunk_loop"), 16)
    self.assertEqual(chunk_memory.kernel_chunk(24, "chunk_loop"), 32)
    self.assertEqual(chunk_memory.kernel_chunk(24, "sequential_grid"), 24)
    self.assertIsNone(reason(MemoryConfig(MODELS["mlp"], UpdateRule("titans"), chunk_size=8), 64))
    # Streamed in slices, the budgets apply to one slice of each layer.
    sliced = lambda config, d, width, dtype=jnp.bfloat16: chunk_memory.unsupported_reason(
        config, d, dtype, driver="chunk_loop", interpret=False,
        blocks=KernelBlocks(hidden_slice=width))
    self.assertIsNone(sliced(big, 128, 32))
    self.assertIn("state of a 64-unit hidden slice is 131072 bytes > 65536",
                  sliced(big, 128, 64, jnp.float32))
    odd = MemoryConfig(MemoryModel("mlp", expansion=1.5), UpdateRule("gd"), chunk_size=16)
    self.assertIn("hidden_slice=64 does not divide the mlp's hidden width 96",
                  sliced(odd, 64, 64))
    self.assertIn("chunk_size=64 x widest layer 128", sliced(
        MemoryConfig(MemoryModel("mlp", expansion=4.0), UpdateRule("gd"), chunk_size=64), 64,
        128))
    self.assertEqual(chunk_memory.sliced_width(MODELS["linear"], 64, KernelBlocks(
        hidden_slice=32)), 0)
    # Split by output feature: the budgets apply to one split row; an mlp is not split.
    split = lambda config, d, n, dtype=jnp.bfloat16: chunk_memory.unsupported_reason(
        config, d, dtype, driver="chunk_loop", interpret=False,
        blocks=KernelBlocks(value_split=n))
    self.assertIsNone(split(titans_128, 128, 2, jnp.float32))
    self.assertIn("head_dim / KernelBlocks.value_split=8: the GPU lowering needs powers of 2 >= 16",
                  split(titans_128, 64, 8))
    self.assertIn("value_split=4 does not divide head_dim=6", chunk_memory.unsupported_reason(
        titans_128, 6, jnp.float32, driver="sequential_grid", interpret=True,
        blocks=KernelBlocks(value_split=4)))
    self.assertEqual(chunk_memory.value_split(_config("mlp", "gd_cumulative"), 64, "chunk_loop",
                                              KernelBlocks(value_split=4)), 1)
    self.assertEqual(chunk_memory.value_split(titans_128, 64, "chunk_loop",
                                              KernelBlocks(value_split=4)), 4)
    wide = MemoryConfig(MemoryModel("mlp", expansion=4.0), UpdateRule("gd"), chunk_size=24)
    self.assertIn("chunk_size=32 (padded from 24) x widest layer 256",
                  reason(wide, 64, jnp.bfloat16))

  def test_auto_value_split_is_the_measured_choice(self):
    # None (auto): rows of 32 output features for a linear memory with head_dim >= 128 on the
    # compiled GPU Pallas row kernel, 16 where the rows would not fill the GPU's SMs.
    titans = _config("linear", "titans_cumulative")
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)

    def split(config, d, rows=None, driver="chunk_loop", interpret=False, **blocks):
      with jax.sharding.use_abstract_mesh(mesh):
        return chunk_memory.value_split(config, d, driver, KernelBlocks(**blocks),
                                        interpret=interpret, rows=rows)

    self.assertIsNone(KernelBlocks().value_split)
    self.assertEqual(split(titans, 128), 4)
    self.assertEqual(split(titans, 128, rows=192), 4)            # a TNT local: 16 shards x 12
    self.assertEqual(split(titans, 128, rows=12), 8)             # one sequence of 12 heads
    self.assertEqual(split(titans, 256, rows=12), 16)
    self.assertEqual(split(titans, 64, rows=12), 1)              # measured slower at d = 64
    self.assertEqual(split(_config("mlp", "titans_cumulative"), 128, rows=12), 1)
    self.assertEqual(split(titans, 128, rows=12, driver="sequential_grid"), 1)   # not measured
    self.assertEqual(split(titans, 128, rows=12, interpret=True), 1)
    self.assertEqual(split(titans, 128, rows=12, value_split=2), 2)
    # Where the Mosaic GPU row kernel takes the op (gd at d = 128) the rows stay whole.
    self.assertEqual(split(_config("linear", "gd_cumulative"), 128, rows=12), 1)

  def test_auto_rerun_groups_fill_the_gpu(self):
    # None (auto): as many checkpoint groups per re-run launch as fill an H100's 132 SMs.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)

    def groups(rows, programs=1, shared=1, full=45, compiled_gpu=True, **blocks):
      with jax.sharding.use_abstract_mesh(mesh):
        return chunk_memory.rerun_groups(KernelBlocks(**blocks), rows=rows,
                                         programs_per_row=programs, shared=shared,
                                         full_groups=full, compiled_gpu=compiled_gpu)

    self.assertIsNone(KernelBlocks().rerun_groups)
    self.assertEqual(groups(12), 11)                   # one sequence of 12 heads
    self.assertEqual(groups(12, programs=4), 2)        # the mlp's clusters of 4: 96 of 124
    self.assertEqual(groups(1, programs=4), 31)        # 31 clusters of 4, not 33
    self.assertEqual(groups(192), 1)                   # a TNT local memory fills the GPU
    self.assertEqual(groups(12, full=3), 3)            # at most the whole groups
    self.assertEqual(groups(12, shared=4), 1)          # value_split's shared rows
    self.assertEqual(groups(12, compiled_gpu=False), 1)
    self.assertEqual(groups(12, compiled_gpu=False, rerun_groups=3), 3)
    self.assertEqual(groups(12, full=1, rerun_groups=3), 1)
    with self.assertRaisesRegex(ValueError, "rerun_groups=0 must be an integer >= 1"):
      KernelBlocks(rerun_groups=0)
    self.assertEqual(KernelBlocks.from_spec("rerun_groups=2").rerun_groups, 2)

  def test_auto_overlap_reruns_where_the_walk_leaves_room(self):
    # None (auto): re-run beside the walk where the Mosaic GPU mlp kernels run compiled and the
    # walk's programs leave an H100's SMs for at least one group's re-run.
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)

    def beside(rows, programs=4, shared=1, full=45, compiled_gpu=True, fusible=True, **blocks):
      with jax.sharding.use_abstract_mesh(mesh):
        return chunk_memory.overlapped_rerun_groups(
            KernelBlocks(**blocks), rows=rows, programs_per_row=programs, shared=shared,
            full_groups=full, compiled_gpu=compiled_gpu, fusible=fusible)

    self.assertIsNone(KernelBlocks().overlap_reruns)
    # As many groups as fill the SMs alone (`rerun_groups`): beside the walk, in two waves.
    self.assertEqual(beside(12), 2)                    # 48 walk, 96 re-run (76 SMs left)
    self.assertEqual(beside(6), 5)                     # 24 walk, 120 re-run
    self.assertEqual(beside(6, full=3), 3)             # at most the whole groups
    self.assertEqual(beside(6, rerun_groups=2), 2)
    self.assertEqual(beside(16), 0)                    # 64 walk leave 60: no room for 64
    self.assertEqual(beside(192), 0)                   # a TNT local memory fills the GPU
    self.assertEqual(beside(12, fusible=False), 0)     # the kernels cannot share a launch
    self.assertEqual(beside(12, compiled_gpu=False), 0)
    self.assertEqual(beside(12, shared=4), 0)
    self.assertEqual(beside(12, full=0), 0)            # one group: nothing to overlap
    self.assertEqual(beside(12, overlap_reruns=False), 0)
    # On: anywhere (the re-run then runs after the walk where the launch cannot be shared).
    self.assertEqual(beside(192, compiled_gpu=False, fusible=False, overlap_reruns=True), 1)
    self.assertEqual(beside(192, overlap_reruns=True), 1)
    self.assertEqual(beside(192, overlap_reruns=True, rerun_groups=3), 3)
    self.assertEqual(beside(12, shared=4, overlap_reruns=True), 0)
    with self.assertRaisesRegex(ValueError, "overlap_reruns=1 must be None"):
      KernelBlocks(overlap_reruns=1)
    self.assertTrue(KernelBlocks.from_spec("overlap_reruns=true").overlap_reruns)
    self.assertFalse(KernelBlocks.from_spec("overlap_reruns=False").overlap_reruns)
    with self.assertRaisesRegex(ValueError, "overlap_reruns='yes' is not true or false"):
      KernelBlocks.from_spec("overlap_reruns=yes")

  def test_bad_blocks_and_driver(self):
    with self.assertRaisesRegex(ValueError, "num_warps=3 must be a power of 2"):
      KernelBlocks(num_warps=3)
    with self.assertRaisesRegex(ValueError, "backward='triton' is unknown"):
      KernelBlocks(backward="triton")
    with self.assertRaisesRegex(ValueError, "max_chunk_activations=0 must be an integer >= 1"):
      KernelBlocks(max_chunk_activations=0)
    with self.assertRaisesRegex(ValueError, "save_every=0 must be an integer >= 1"):
      KernelBlocks(save_every=0)
    with self.assertRaisesRegex(ValueError, "hidden_slice=48 must be 0 .off. or a power of 2"):
      KernelBlocks(hidden_slice=48)
    with self.assertRaisesRegex(ValueError, "layout='rows' is unknown"):
      KernelBlocks(layout="rows")
    with self.assertRaisesRegex(ValueError, "hidden_slice=64 streams a token-major state"):
      KernelBlocks(hidden_slice=64, layout="features")
    with self.assertRaisesRegex(ValueError, "value_split=3 must be None .auto. or a power of 2 >= 1"):
      KernelBlocks(value_split=3)
    with self.assertRaisesRegex(ValueError, "value_split=2 splits rows for the Pallas row"):
      KernelBlocks(value_split=2, row_lowering="mosaic_gpu")
    config = _config("linear", "gd_cumulative")
    with self.assertRaisesRegex(ValueError, "driver='warp' is unknown"):
      kernel_memory(*_inputs(config, 64, jnp.float32, 0), config, driver="warp", interpret=True)

  def test_layout_default_is_the_measured_choice(self):
    resolve = lambda blocks, kind, driver: blocks.resolved_layout(kind, driver)
    self.assertEqual(resolve(KernelBlocks(), "linear", "chunk_loop"), "features")
    self.assertEqual(resolve(KernelBlocks(), "mlp", "chunk_loop"), "tokens")
    self.assertEqual(resolve(KernelBlocks(), "linear", "sequential_grid"), "tokens")
    self.assertEqual(resolve(KernelBlocks(hidden_slice=32), "linear", "chunk_loop"), "tokens")
    self.assertEqual(resolve(KernelBlocks(layout="tokens"), "linear", "chunk_loop"), "tokens")
    self.assertEqual(resolve(KernelBlocks(layout="features"), "mlp", "sequential_grid"),
                     "features")

  def test_blocks_from_a_flag_spec(self):
    self.assertEqual(KernelBlocks.from_spec("default"), KernelBlocks())
    self.assertEqual(KernelBlocks.from_spec("save_every=1+backward_num_warps=4"),
                     KernelBlocks(save_every=1, backward_num_warps=4))
    self.assertEqual(KernelBlocks.from_spec("backward=xla"), KernelBlocks(backward="xla"))
    self.assertEqual(KernelBlocks.from_spec("hidden_slice=64+num_warps=4"),
                     KernelBlocks(hidden_slice=64, num_warps=4))
    self.assertEqual(KernelBlocks.from_spec("layout=features+save_every=1"),
                     KernelBlocks(layout="features", save_every=1))
    self.assertEqual(KernelBlocks.from_spec("value_split=4+save_every=1"),
                     KernelBlocks(value_split=4, save_every=1))
    with self.assertRaisesRegex(ValueError, "KernelBlocks spec 'warps=4': 'warps=4' must be "
                                "field=value with field in"):
      KernelBlocks.from_spec("warps=4")
    with self.assertRaisesRegex(ValueError, "save_every=0 must be an integer >= 1"):
      KernelBlocks.from_spec("save_every=0")
    with self.assertRaisesRegex(ValueError, "save_every='auto' is not an integer"):
      KernelBlocks.from_spec("save_every=auto")

  def test_pallas_on_cpu_falls_back_to_xla_with_a_reason(self):
    if jax.default_backend() != "cpu":
      self.skipTest("checks the CPU fallback")
    config = _config("mlp", "titans_cumulative")
    self.assertIn("platform='cpu'", api.kernel_fallback_reason(config, 64, jnp.float32, False))
    args = _inputs(config, 64, jnp.float32, 2)
    got = memory_op(*args[:5], {}, config, implementation="pallas")
    want = memory_op(*args[:5], {}, config, implementation="xla")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    self.assertEqual(rel_err(got[0], want[0]), 0.0)


if __name__ == "__main__":
  absltest.main()
