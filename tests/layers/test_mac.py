"""Titans MAC (tnt_jax/layers/mac.py) against a literal per-segment reference (float64: outputs,
memory states and every parameter gradient), the update-after-attention order, the memory state
before a segment independent of the segment and later inputs, causality by gradient, bf16, and
bad configs. Parallel == streaming == decoding: tests/models/test_decoding.py (mac_*)."""

import functools

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.helpers import assert_trees_rel_close, outputs_and_vjp, rel_err
from tnt_jax.layers.attention import AttentionConfig, rope
from tnt_jax.layers.configs import preset
from tnt_jax.layers.mac import MACConfig, MACMixer
from tnt_jax.memory.models import plain_dense
from tnt_jax.memory.reference import reference_memory
from tnt_jax.models import LMConfig
from tnt_jax.models.flops import lm_train_flops
from tnt_jax.train.trainer import check_model_context_split

D, HEADS, WINDOW, PERSISTENT, T = 16, 2, 8, 3, 20   # segments of 8, 8 and 4 tokens
MEMORY_OPTIONS = {"titans": dict(chunk_size=4),
                  "tnt": dict(global_chunk=8, local_chunks=(2,), shard_lengths=8)}


def _mixer(memory_kind, seed=0, dtype=jnp.float64, persistent=PERSISTENT):
  memory = preset(memory_kind, d_model=D, num_heads=HEADS, **MEMORY_OPTIONS[memory_kind])
  attention = AttentionConfig(d_model=D, num_heads=HEADS, window=WINDOW,
                              persistent_tokens=persistent)
  return MACMixer(MACConfig(memory, attention), rngs=nnx.Rngs(seed), dtype=dtype)


def _rms(y, scale):
  return y / jnp.sqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6) * scale


def _memory_head(memory, o_BxLxHxD, x_BxLxD):
  """The memory layer's output head: per-head RMSNorm, gate by x, output projection."""
  b, l = x_BxLxD.shape[:2]
  o = memory.out_norm(o_BxLxHxD).reshape(b, l, -1)
  return memory.out_proj(o * jax.nn.silu(memory.gate_proj(x_BxLxD)))


def mac_reference(mixer, x_BxTxD):
  """MAC written out: a Python loop over segments, the memory through the token-level reference
  (memory/reference.py), attention by hand with an explicit mask. Returns the outputs, the
  global memory's state before each segment, and each segment's attention output y."""
  memory, attention, s = mixer.memory, mixer.attention, mixer.config.segment
  tnt, a = memory.tnt, attention.config
  b, t, _ = x_BxTxD.shape
  x = x_BxTxD.astype(mixer.dtype)
  weights = [m.weights() for m in memory.memories]
  slows = [m.slow_params() for m in memory.memories]
  q_x = memory.qkv(x)[0]                         # the memory's queries of x, whole sequence
  heads = lambda y: y.reshape(y.shape[:-1] + (a.num_heads, a.head_dim))
  p = attention.persistent[...].astype(x.dtype)
  k_p = jnp.broadcast_to(heads(attention.k_proj(p)), (b, a.persistent_tokens, a.num_heads,
                                                      a.head_dim))
  v_p = jnp.broadcast_to(heads(attention.v_proj(p)), k_p.shape)
  state = tnt.global_memory.init_state(weights[0], b)
  history = {n: jnp.zeros((b, memory.config.conv_width - 1, memory.config.inner_dim), x.dtype)
             for n in "qkv"}
  read = jax.vmap(jax.vmap(lambda w, sl, q: tnt.global_memory.model.apply(plain_dense(w), sl, q)),
                  in_axes=(0, None, 0))
  outs, states, ys = [], [state], []
  for lo in range(0, t, s):
    x_s = x[:, lo:lo + s]
    n = x_s.shape[1]
    # retrieval: read the memory as it is before the segment, with the queries of x_s
    o = read(state.weights, slows[0], jnp.swapaxes(q_x[:, lo:lo + s], 1, 2))
    h = _memory_head(memory, jnp.swapaxes(o, 1, 2).astype(x.dtype), x_s)
    # attention over [persistent | h | x_s], offsets in the segment as positions
    pos = jnp.arange(n)
    q = rope(heads(attention.q_proj(x_s)), pos, a.rope_base)
    keys = jnp.concatenate([k_p, rope(heads(attention.k_proj(h)), pos, a.rope_base),
                            rope(heads(attention.k_proj(x_s)), pos, a.rope_base)], axis=1)
    values = jnp.concatenate([v_p, heads(attention.v_proj(h)), heads(attention.v_proj(x_s))],
                             axis=1)
    causal = pos[None, :] <= pos[:, None]                                   # j <= i
    mask = jnp.concatenate([jnp.ones((n, a.persistent_tokens), bool), causal, causal], axis=1)
    scores = jnp.einsum("bthd,bshd->bhts", q, keys) / np.sqrt(a.head_dim)
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    att = jnp.einsum("bhts,bshd->bthd", probs, values).reshape(b, n, -1)
    y = attention.out_proj(att * jax.nn.silu(attention.gate_proj(x_s)))
    ys.append(y)
    # then the memory: updated with y from the state before the segment, read with y
    q_y, k_y, v_y, history = memory.qkv(y, history)
    gates = [m.gates(y) for m in memory.memories]
    r, state = reference_memory(q_y, k_y, v_y, gates[0], state, slows[0], tnt.global_memory)
    for i, local in enumerate(tnt.local_memories):   # every segment starts a shard: W_init
      r = r + reference_memory(q_y, k_y, v_y, gates[i + 1],
                               local.memory.init_state(weights[i + 1], b), slows[i + 1],
                               local.memory, shard_length=local.shard_length,
                               qk_projection=tnt.qk_projection)[0]
    remembered = _memory_head(memory, r.astype(x.dtype), y)
    outs.append(_rms(y, mixer.attention_norm.scale[...])
                * jax.nn.sigmoid(_rms(remembered, mixer.memory_norm.scale[...])))
    states.append(state)
  return jnp.concatenate(outs, axis=1), states[:-1], ys


@functools.lru_cache(maxsize=None)
def _layer_and_reference(memory_kind):
  """Layer and reference on one input, float64: outputs, vjps at one random cotangent, the
  memory states before each segment and (reference) each segment's attention output."""
  mixer = _mixer(memory_kind)
  graphdef, params = nnx.split(mixer)
  x = jax.random.normal(jax.random.key(1), (2, T, D), jnp.float64)
  layer = lambda params, x: nnx.merge(graphdef, params).segment_states(x)
  reference = lambda params, x: (lambda o, states, ys: (o, (states, ys)))(
      *mac_reference(nnx.merge(graphdef, params), x))

  def run(fn):
    out, vjp, aux = jax.vjp(fn, params, x, has_aux=True)
    return out, vjp(jax.random.normal(jax.random.key(9), out.shape, out.dtype)), aux

  with jax.enable_x64(True):
    return mixer, x, jax.jit(lambda: run(layer))(), jax.jit(lambda: run(reference))()


class MACTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  @parameterized.named_parameters(("titans", "titans"), ("tnt", "tnt"))
  def test_equals_literal_reference_with_gradients(self, memory_kind):
    _, _, (got, got_grads, states), (want, want_grads, (ref_states, _)) = (
        _layer_and_reference(memory_kind))
    assert_trees_rel_close(self, got, want, 1e-6, "out")
    # every parameter, the persistent tokens included, has a non-zero reference gradient
    assert_trees_rel_close(self, got_grads, want_grads, 1e-6, "grad")
    carry = states["memory"].global_carry
    for s in (1, 2):   # the global memory's state before each segment (before 0: W_init)
      got_state = jax.tree.map(lambda y: y[s], (carry["w"], carry["m"]))
      assert_trees_rel_close(self, got_state, tuple(ref_states[s]), 1e-6, f"state {s}")

  def test_memory_is_updated_with_the_attention_output(self):
    """After segment 0 the memory holds the update on the projections of y_0 (the attention
    output), not of x_0: public implementations that update before attention, on the segment's
    inputs, fail this."""
    mixer, x, (_, _, states), (_, _, (_, ys)) = _layer_and_reference("titans")
    memory = mixer.memory
    params = memory.memories[0]
    initial = memory.tnt.global_memory.init_state(params.weights(), x.shape[0])

    @jax.jit
    def update_on(z):
      q, k, v = memory.qkv(z)
      return reference_memory(q, k, v, params.gates(z), initial, params.slow_params(),
                              memory.tnt.global_memory)[1].weights

    delta = lambda w: jax.tree.map(lambda a, b: a - b, w, initial.weights)
    after_segment0 = delta(jax.tree.map(lambda w: w[1], states["memory"].global_carry["w"]))
    assert_trees_rel_close(self, after_segment0, delta(update_on(ys[0])), 1e-6, "on y_0")
    for mine, on_x in zip(jax.tree.leaves(after_segment0),
                          jax.tree.leaves(delta(update_on(x[:, :WINDOW])))):
      self.assertGreater(rel_err(mine, on_x), 0.1)

  def test_state_before_a_segment_ignores_that_segment_and_later_inputs(self):
    mixer = _mixer("tnt", seed=4)   # global and local memories, their conv histories
    x = jax.random.normal(jax.random.key(5), (1, T, D), jnp.float64)

    def state_sums(x):
      _, states = mixer.segment_states(x)
      leaves = [l for l in jax.tree.leaves(states) if l.ndim > 1]   # all but the position
      return jnp.stack([sum(jnp.sum(jnp.sin(l[s])) for l in leaves) for s in (1, 2)])

    jac = jax.jit(jax.jacrev(state_sums))(x)            # [2, 1, T, D]
    for i, s in enumerate((1, 2)):
      np.testing.assert_array_equal(jac[i, :, s * WINDOW:], 0.0)
      self.assertGreater(float(jnp.min(jnp.max(jnp.abs(jac[i, 0, :s * WINDOW]), axis=-1))), 0.0)

  def test_output_at_t_has_zero_gradient_from_later_inputs(self):
    mixer = _mixer("titans", seed=6)
    length = 2 * WINDOW
    x = jax.random.normal(jax.random.key(7), (1, length, D), jnp.float64)
    grad = jax.jit(jax.grad(lambda x, t: jnp.sum(jax.lax.dynamic_index_in_dim(mixer(x), t, 1))))
    for t in range(length):
      g = grad(x, t)
      np.testing.assert_array_equal(g[:, t + 1:], 0.0, err_msg=f"t={t}")
      self.assertGreater(float(jnp.max(jnp.abs(g[:, :t + 1]))), 0.0)
    # the first segment reaches the second (through the memory only)
    self.assertGreater(float(jnp.max(jnp.abs(g[:, 0]))), 0.0)

  def test_bfloat16_close_to_float32(self):
    jax.config.update("jax_enable_x64", False)
    x = jax.random.normal(jax.random.key(10), (2, 2 * WINDOW, D))
    want = jax.jit(_mixer("titans", seed=11, dtype=jnp.float32))(x)
    got = jax.jit(_mixer("titans", seed=11, dtype=jnp.bfloat16))(x)
    self.assertEqual(got.dtype, jnp.bfloat16)
    self.assertLess(rel_err(got, want), 2e-2)

  def test_bad_configs_raise(self):
    titans = preset("titans", d_model=D, num_heads=HEADS, chunk_size=4)
    attention = lambda **kw: AttentionConfig(**{**dict(d_model=D, num_heads=HEADS,
                                                     window=WINDOW), **kw})
    with self.assertRaisesRegex(ValueError, r"window=6 must be a multiple of the titans "
                                            r"memory's alignment\(\)=4"):
      MACConfig(titans, attention(window=6))
    with self.assertRaisesRegex(ValueError, "segment length is the attention window"):
      MACConfig(titans, attention(window=None))
    with self.assertRaisesRegex(ValueError, "d_model=32 differ"):
      MACConfig(titans, AttentionConfig(d_model=32, num_heads=HEADS, window=WINDOW))
    with self.assertRaisesRegex(ValueError, "persistent_tokens=-1"):
      attention(persistent_tokens=-1)
    with self.assertRaisesRegex(ValueError, "'cudnn' cannot take persistent_tokens=2"):
      attention(persistent_tokens=2, implementation="cudnn")
    lm = lambda **kw: LMConfig(**{**dict(vocab_size=8, d_model=D, num_layers=2,
                                         num_heads=HEADS, pattern=("mac:tnt",),
                                         mixer_options={"tnt": MEMORY_OPTIONS["tnt"]},
                                         window=WINDOW), **kw})
    with self.assertRaisesRegex(ValueError, r"window=12 must be a multiple of the tnt memory's "
                                            r"alignment\(\)=8"):
      lm(window=12)
    with self.assertRaisesRegex(ValueError, "mixer 'mac:swa'.*mag/mal/mac:<memory kind>"):
      lm(pattern=("mac:swa",))
    config = lm(mixer_options={"tnt": MEMORY_OPTIONS["tnt"], "swa": {"persistent_tokens": 2}})
    self.assertEqual(config.mixer_config(0).attention.persistent_tokens, 2)
    with self.assertRaisesRegex(ValueError, "layer 0's mixer 'mac:tnt' \\(Titans MAC\\).*"
                                            "mesh.context=1"):
      check_model_context_split(32, 2, config)
    check_model_context_split(32, 1, config)
    with self.assertRaisesRegex(ValueError, "no context-parallel form"):
      _mixer("titans")(jnp.zeros((1, 8, D)), context_axis="context")
    # the FLOP count takes MAC's own path: attention over 2S + P keys, memory on y, retrieval
    mag = lm(pattern=("mag:tnt",), mixer_options=config.mixer_options)
    self.assertGreater(lm_train_flops(config, 2, 32), lm_train_flops(mag, 2, 32))


if __name__ == "__main__":
  absltest.main()
