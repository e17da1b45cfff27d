"""The token-level reference and its building blocks against hand-written numpy math.

Nothing here uses jax.grad: gradients of the inner loss are written out by hand, so these tests
check the reference (the oracle every fast path is compared with) independently of itself.
All comparisons run in float64.
"""

import zlib

from absl.testing import absltest, parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import random_inputs
from tnt_jax.memory import MemoryConfig, MemoryModel, UpdateRule
from tnt_jax.memory.models import LAYERNORM_EPS, plain_dense
from tnt_jax.memory.rules import NORM_EPS, newton_schulz
from tnt_jax.ops.api import memory_op

TOL = 1e-10   # float64: the reference and the numpy loops differ only by rounding


def _seed(*names) -> int:
  """A seed per test case that is the same in every process (unlike hash())."""
  return zlib.crc32("/".join(map(str, names)).encode()) % 100_000


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _assert_close(testcase, got, want, what, tol=TOL):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  testcase.assertEqual(got.shape, want.shape, f"{what}: shapes differ")
  testcase.assertTrue(np.all(np.isfinite(got)), f"{what}: not finite")
  testcase.assertGreater(np.abs(want).max(), 0.0, f"{what}: expected value is all zeros")
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  testcase.assertLess(err, tol, f"{what}: relative error {err:.3e} >= {tol:.1e}")


# ------------------------------------------------------------------------------------------------
# Hand-written numpy memories (one head; weights are {layer: [out, in]} numpy arrays).


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


NP_ACTIVATIONS = {
    "gelu": _gelu_tanh,
    "silu": lambda x: x * _sigmoid(x),
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
}


def _np_layer_norm(x, scale, offset):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + LAYERNORM_EPS) * scale + offset


def _np_forward(model, w, slow, x):
  """f(W; x) for x [..., d], written out layer by layer. w: {layer: {"w": .., ["b": ..]}}."""
  def dense(name, h):
    y = h @ w[name]["w"].T
    return y + w[name]["b"] if "b" in w[name] else y

  act = NP_ACTIVATIONS[model.activation]
  if model.kind == "linear":
    y = dense("w0", x)
  elif model.kind == "swiglu":
    a = dense("w1", x)
    y = dense("w2", a * _sigmoid(a) * dense("w3", x))
  else:
    y = x
    for i in range(model.depth):
      y = dense(f"w{i}", y)
      if i < model.depth - 1:
        y = act(y)
  if model.residual_norm:
    y = x + _np_layer_norm(y, slow["ln_scale"], slow["ln_offset"])
  return y


def _loss_grad_y(y, v, loss):
  """d loss / d y for one token: l2 = ||y - v||^2, dot = -y.v."""
  return 2.0 * (y - v) if loss == "l2" else -v


def _np_grad(model, w, k, v, loss):
  """Hand-derived gradient of the inner loss w.r.t. the weights {layer: [out, in]}, one token.

  Supports the linear model (no bias, no residual_norm) and the 2-layer tanh mlp (no bias).
  """
  if model.kind == "linear":
    r = _loss_grad_y(w["w0"] @ k, v, loss)
    return {"w0": np.outer(r, k)}
  assert model.kind == "mlp" and model.depth == 2 and model.activation == "tanh"
  h = np.tanh(w["w0"] @ k)
  r = _loss_grad_y(w["w1"] @ h, v, loss)
  dz = (w["w1"].T @ r) * (1.0 - h**2)
  return {"w0": np.outer(dz, k), "w1": np.outer(r, h)}


def _forward_w(model, w, x):
  """f(W; x) for weights {layer: [out, in]} without biases or slow params."""
  return _np_forward(model, {n: {"w": m} for n, m in w.items()}, {}, x)


def _np_token_loop(model, q, k, v, theta, eta, alpha, w0, s0, *, rule, read, chunk, loss):
  """SPEC 1.1 as a literal numpy loop over tokens, one head. Returns (o [T, d], w, s)."""
  w = {n: m.copy() for n, m in w0.items()}
  s = None if s0 is None else {n: m.copy() for n, m in s0.items()}
  outputs = []
  for t in range(q.shape[0]):
    if t % chunk == 0:
      w_start = {n: m.copy() for n, m in w.items()}
    u = _np_grad(model, w_start, k[t], v[t], loss)
    if rule == "gd":
      w = {n: w[n] - theta[t] * u[n] for n in w}
    else:
      s = {n: eta[t] * s[n] - theta[t] * u[n] for n in w}
      w = {n: (1.0 - alpha[t]) * w[n] + s[n] for n in w}
    read_w = w if read == "cumulative" else w_start
    outputs.append(_forward_w(model, read_w, q[t]))
  return np.stack(outputs), w, s


def _np_newton_schulz(g, steps=5):
  """Muon's quintic Newton-Schulz iteration, written independently in numpy."""
  a, b, c = 3.4445, -4.7750, 2.0315
  tall = g.shape[0] > g.shape[1]
  x = g.T if tall else g
  x = x / (np.linalg.norm(x) + NORM_EPS)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


def _np_lact_linear(q, k, v, theta, eta, w0, m0, *, chunk, loss, momentum, muon):
  """SPEC 1.4 for the linear model, chunk by chunk, one head. Returns (o [T, d], w, m)."""
  w = w0.copy()
  m = None if m0 is None else m0.copy()
  outputs = np.zeros_like(q)
  for start in range(0, q.shape[0], chunk):
    sl = slice(start, min(start + chunk, q.shape[0]))
    outputs[sl] = q[sl] @ w.T                                    # read before the update
    g = sum(th * _np_grad(MemoryModel("linear"), {"w0": w}, kt, vt, loss)["w0"]
            for th, kt, vt in zip(theta[sl], k[sl], v[sl]))
    if momentum:
      m = np.mean(eta[sl]) * m + g
      g = m
    if muon:
      g = _np_newton_schulz(g)
    w_new = w - g
    w = w_new * (np.linalg.norm(w, axis=-1, keepdims=True)
                 / np.linalg.norm(w_new, axis=-1, keepdims=True))
  return outputs, w, m


def _run_reference(config, args):
  q, k, v, gates, state, slow = args
  return memory_op(q, k, v, gates, state, slow, config, implementation="reference")


class _X64TestCase(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", previous)


class ReferenceVsNumpyTest(_X64TestCase):
  """reference_memory against numpy loops with hand-written gradients."""

  def _inputs(self, config, seed, length=13):
    args = random_inputs(config, jax.random.key(seed), length=length, dtype=jnp.float64)
    self.assertEqual(args[0].dtype, jnp.float64)
    return args

  def _check_token_loop(self, config, seed, length=13):
    args = self._inputs(config, seed, length)
    out, state = _run_reference(config, args)
    self.assertEqual(out.dtype, jnp.float64)
    q, k, v, gates, state0, _ = _np(args)
    batch, _, heads, _ = q.shape
    want_out = np.zeros_like(q)
    want_w = jax.tree.map(np.zeros_like, state0.weights)
    want_s = None if state0.momentum is None else jax.tree.map(np.zeros_like, state0.momentum)
    for b in range(batch):
      for h in range(heads):
        per_head = lambda g: None if g is None else g[b, :, h]
        w0 = {n: layer["w"][b, h] for n, layer in state0.weights.items()}
        s0 = (None if state0.momentum is None
              else {n: layer["w"][b, h] for n, layer in state0.momentum.items()})
        o, w, s = _np_token_loop(
            config.model, q[b, :, h], k[b, :, h], v[b, :, h], per_head(gates.theta),
            per_head(gates.eta), per_head(gates.alpha), w0, s0, rule=config.rule.kind,
            read=config.read, chunk=config.chunk_size, loss=config.loss)
        want_out[b, :, h] = o
        for n in w:
          want_w[n]["w"][b, h] = w[n]
          if s is not None:
            want_s[n]["w"][b, h] = s[n]
    _assert_close(self, out, want_out, "output")
    for n in want_w:
      _assert_close(self, state.weights[n]["w"], want_w[n]["w"], f"weights[{n}]")
      # The state moved: the test would notice a reference that never updates.
      self.assertGreater(np.abs(want_w[n]["w"] - state0.weights[n]["w"]).max(), 1e-3)
    if want_s is None:
      self.assertIsNone(state.momentum)
    else:
      for n in want_s:
        _assert_close(self, state.momentum[n]["w"], want_s[n]["w"], f"momentum[{n}]")

  @parameterized.parameters("l2", "dot")
  def test_chunk1_linear_gd_is_online_gd(self, loss):
    """W <- W - theta_t grad_t(W), o_t = W q_t: plain online gradient descent."""
    config = MemoryConfig(MemoryModel("linear"), UpdateRule("gd"), loss, "cumulative", 1)
    self._check_token_loop(config, _seed("gd1", loss))

  @parameterized.parameters("l2", "dot")
  def test_chunk1_linear_titans(self, loss):
    """S <- eta S - theta grad; W <- (1 - alpha) W + S; o = W q; momentum starts non-zero."""
    config = MemoryConfig(MemoryModel("linear"), UpdateRule("titans"), loss, "cumulative", 1)
    self._check_token_loop(config, _seed("titans1", loss))

  @parameterized.product(rule=("gd", "titans"), read=("cumulative", "chunk_start"),
                         chunk=(3, 4))
  def test_chunked_linear_token_loop(self, rule, read, chunk):
    """Gradients at the chunk-start state; 13 tokens leave a partial last chunk."""
    config = MemoryConfig(MemoryModel("linear"), UpdateRule(rule), "l2", read, chunk)
    self._check_token_loop(config, _seed("chunked", rule, read, chunk))

  @parameterized.product(rule=("gd", "titans"), chunk=(1, 3), loss=("l2", "dot"))
  def test_tanh_mlp_hand_backprop(self, rule, chunk, loss):
    """A 2-layer memory, gradients by hand-written backprop through tanh."""
    model = MemoryModel("mlp", depth=2, expansion=2.0, activation="tanh")
    config = MemoryConfig(model, UpdateRule(rule), loss, "cumulative", chunk)
    self._check_token_loop(config, _seed("mlp", rule, chunk, loss), length=10)

  @parameterized.parameters(13, 12, 3)
  def test_chunk4_gd_chunk_start_chunk_form(self, length):
    """C = 4, chunk-start read, written per chunk: o = W_start q; W -= sum theta_i grad_i."""
    config = MemoryConfig(MemoryModel("linear"), UpdateRule("gd"), "l2", "chunk_start", 4)
    args = self._inputs(config, _seed("gd4", length), length)
    out, state = _run_reference(config, args)
    q, k, v, gates, state0, _ = _np(args)
    want_out = np.zeros_like(q)
    want_w = state0.weights["w0"]["w"].copy()
    for b in range(q.shape[0]):
      for h in range(q.shape[2]):
        w = want_w[b, h]
        for start in range(0, length, 4):
          idx = range(start, min(start + 4, length))
          grad = np.zeros_like(w)
          for t in idx:
            want_out[b, t, h] = w @ q[b, t, h]
            k_t, v_t = k[b, t, h], v[b, t, h]
            grad += gates.theta[b, t, h] * 2.0 * np.outer(w @ k_t - v_t, k_t)
          w = w - grad
        want_w[b, h] = w
    _assert_close(self, out, want_out, "output")
    _assert_close(self, state.weights["w0"]["w"], want_w, "weights")
    # Outputs of the first chunk are read at W_init: the update is not visible inside a chunk.
    first = min(length, 4)
    np.testing.assert_allclose(
        np.asarray(out[:, :first]),
        np.einsum("bhoi,bthi->btho", state0.weights["w0"]["w"], q[:, :first]),
        rtol=1e-12, atol=1e-12)

  @parameterized.product(momentum=(False, True), muon=(False, True), loss=("l2", "dot"))
  def test_lact_linear(self, momentum, muon, loss):
    """Per chunk: read, g = sum theta_i grad_i, [m = beta m + g], [NS5], rows keep their norm."""
    rule = UpdateRule("lact", momentum=momentum, muon=muon)
    config = MemoryConfig(MemoryModel("linear"), rule, loss, "chunk_start", 4)
    args = self._inputs(config, _seed("lact", momentum, muon, loss))
    out, state = _run_reference(config, args)
    q, k, v, gates, state0, _ = _np(args)
    want_out = np.zeros_like(q)
    want_w = np.zeros_like(state0.weights["w0"]["w"])
    want_m = None if state0.momentum is None else np.zeros_like(want_w)
    for b in range(q.shape[0]):
      for h in range(q.shape[2]):
        m0 = None if state0.momentum is None else state0.momentum["w0"]["w"][b, h]
        eta = None if gates.eta is None else gates.eta[b, :, h]
        o, w, m = _np_lact_linear(q[b, :, h], k[b, :, h], v[b, :, h], gates.theta[b, :, h],
                                  eta, state0.weights["w0"]["w"][b, h], m0, chunk=4, loss=loss,
                                  momentum=momentum, muon=muon)
        want_out[b, :, h], want_w[b, h] = o, w
        if m is not None:
          want_m[b, h] = m
    _assert_close(self, out, want_out, "output")
    _assert_close(self, state.weights["w0"]["w"], want_w, "weights")
    self.assertGreater(np.abs(want_w - state0.weights["w0"]["w"]).max(), 1e-3)
    if want_m is None:
      self.assertIsNone(state.momentum)
    else:
      _assert_close(self, state.momentum["w0"]["w"], want_m, "momentum")
    # Each row (axis -1 of [out, in]) keeps the norm it had before any update.
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(state.weights["w0"]["w"]), axis=-1),
        np.linalg.norm(state0.weights["w0"]["w"], axis=-1), rtol=1e-9, atol=0)


class NewtonSchulzTest(_X64TestCase):

  @parameterized.parameters((8, 16), (16, 8), (12, 12))
  def test_approximates_polar_factor(self, rows, cols):
    for seed in range(4):
      g = np.random.default_rng(_seed("ns", rows, cols, seed)).standard_normal((rows, cols))
      x = np.asarray(newton_schulz(jnp.asarray(g), 5))
      self.assertEqual(x.shape, g.shape)
      self.assertTrue(np.all(np.isfinite(x)))
      u, sigma, vt = np.linalg.svd(g, full_matrices=False)
      polar = u @ vt
      s = np.linalg.svd(x, compute_uv=False)
      # NS5 multiplies a tiny singular value by about 3.4 per step: one below ~1e-3 of ||G||_F
      # cannot reach the band in 5 steps. Random square matrices sometimes have one (random
      # rectangular ones do not), so the lower bound applies to the well-separated ones.
      resolvable = sigma / np.linalg.norm(g) > 2e-3
      if rows != cols:
        self.assertTrue(np.all(resolvable), f"seed {seed}: sigma/||G|| = {sigma / np.linalg.norm(g)}")
      self.assertLessEqual(s.max(), 1.25, f"seed {seed}: singular values {s}")
      # x = U diag(phi(sigma)) V^T exactly (a matrix polynomial keeps the singular vectors).
      phi = np.einsum("oi,oj,ji->i", u, x, vt.T)
      np.testing.assert_allclose(u @ np.diag(phi) @ vt, x, rtol=0, atol=1e-10)
      self.assertTrue(np.all((phi[resolvable] >= 0.6) & (phi[resolvable] <= 1.25)),
                      f"seed {seed}: phi(sigma) = {phi}")
      self.assertGreater(np.sum(x * polar), 0.0)
      rel = np.linalg.norm(x - polar) / np.linalg.norm(polar)
      self.assertLess(rel, 0.35, f"seed {seed}")
      # And it is what the numpy transcription of Muon's iteration gives.
      np.testing.assert_allclose(x, _np_newton_schulz(g), rtol=1e-10, atol=1e-12)

  def test_well_conditioned_square_all_in_band(self):
    rng = np.random.default_rng(_seed("ns_square"))
    q1, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    q2, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    g = q1 @ np.diag(rng.uniform(0.05, 3.0, 12)) @ q2.T
    s = np.linalg.svd(np.asarray(newton_schulz(jnp.asarray(g), 5)), compute_uv=False)
    self.assertTrue(np.all((s >= 0.6) & (s <= 1.25)), f"singular values {s}")

  def test_transpose_and_batch(self):
    rng = np.random.default_rng(_seed("ns_batch"))
    g = rng.standard_normal((3, 8, 16))
    x = np.asarray(newton_schulz(jnp.asarray(g), 5))
    x_t = np.asarray(newton_schulz(jnp.asarray(np.swapaxes(g, 1, 2)), 5))
    np.testing.assert_allclose(np.swapaxes(x_t, 1, 2), x, rtol=1e-10, atol=1e-12)
    for i in range(3):
      np.testing.assert_allclose(x[i], np.asarray(newton_schulz(jnp.asarray(g[i]), 5)),
                                 rtol=1e-10, atol=1e-12)


class MemoryModelForwardTest(_X64TestCase):

  @parameterized.named_parameters(
      ("linear", MemoryModel("linear")),
      ("linear_bias", MemoryModel("linear", bias=True)),
      ("mlp2_silu", MemoryModel("mlp", depth=2, expansion=2.0, activation="silu")),
      ("mlp3_gelu", MemoryModel("mlp", depth=3, expansion=2.0, activation="gelu")),
      ("mlp3_relu_bias", MemoryModel("mlp", depth=3, expansion=1.5, activation="relu",
                                     bias=True)),
      ("mlp4_tanh", MemoryModel("mlp", depth=4, expansion=0.5, activation="tanh")),
      ("swiglu", MemoryModel("swiglu", expansion=2.0)),
      ("swiglu_bias", MemoryModel("swiglu", expansion=3.0, bias=True)),
      ("ttt_linear", MemoryModel("linear", residual_norm=True, bias=True)),
      ("ttt_mlp3", MemoryModel("mlp", depth=3, expansion=2.0, residual_norm=True)),
      ("ttt_swiglu", MemoryModel("swiglu", expansion=2.0, residual_norm=True, bias=True)),
  )
  def test_apply_matches_numpy(self, model):
    d = 6
    rng = np.random.default_rng(_seed("fwd", model))
    weights = {}
    for name, (out_dim, in_dim) in model.layer_shapes(d).items():
      weights[name] = {"w": rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)}
      if model.bias:
        weights[name]["b"] = 0.3 * rng.standard_normal(out_dim)
    slow = {}
    if model.residual_norm:
      slow = {"ln_scale": 1.0 + 0.2 * rng.standard_normal(d),
              "ln_offset": 0.2 * rng.standard_normal(d)}
    x = rng.standard_normal((5, d))
    got = model.apply(plain_dense(jax.tree.map(jnp.asarray, weights)),
                      jax.tree.map(jnp.asarray, slow), jnp.asarray(x))
    chex.assert_shape(got, (5, d))
    self.assertEqual(got.dtype, jnp.float64)
    _assert_close(self, got, _np_forward(model, weights, slow, x), "f(W; x)", tol=1e-12)
    # The non-trivial part is not vacuous: x + LN(y) differs from x by an O(1) amount.
    self.assertGreater(np.abs(np.asarray(got) - x).max(), 0.1)

  def test_gelu_is_tanh_form(self):
    x = np.linspace(-4.0, 4.0, 41)
    model = MemoryModel("mlp", depth=2, expansion=1.0, activation="gelu")
    weights = {"w0": {"w": np.eye(1)}, "w1": {"w": np.eye(1)}}
    got = np.asarray(model.apply(plain_dense(jax.tree.map(jnp.asarray, weights)), {},
                                 jnp.asarray(x[:, None])))[:, 0]
    np.testing.assert_allclose(got, _gelu_tanh(x), rtol=1e-12, atol=1e-14)
    # The erf form differs by ~1e-3 somewhere in this range, so the check can tell them apart.
    erf_form = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))
    self.assertGreater(np.abs(got - erf_form).max(), 1e-4)

  @parameterized.parameters(
      (MemoryModel("linear"), 4, {"w0": (4, 4)}),
      (MemoryModel("mlp", depth=3, expansion=2.0), 4, {"w0": (8, 4), "w1": (8, 8), "w2": (4, 8)}),
      (MemoryModel("mlp", depth=2, expansion=1.5), 6, {"w0": (9, 6), "w1": (6, 9)}),
      (MemoryModel("swiglu", expansion=2.0), 5, {"w1": (10, 5), "w3": (10, 5), "w2": (5, 10)}),
  )
  def test_layer_shapes(self, model, d, want):
    self.assertEqual(model.layer_shapes(d), want)
    self.assertEqual(list(model.layer_shapes(d)), list(want))   # order matters to apply()


if __name__ == "__main__":
  absltest.main()
