"""The in-chunk gate coefficients (ops/transitions.py) against literal 2x2 matrix products, on both
of its paths (the unrolled token loop for short chunks, the associative scan for long ones)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from tnt_jax.ops import transitions


def literal_coefficients(theta, eta, alpha, valid):
  """Per (row, t, j): M_t ... M_{j+1} from explicit 2x2 matrices, M = [[1-a, e], [0, e]] on
  valid tokens and the identity elsewhere; x_j enters with -theta_j (numpy, float64)."""
  rows, c = theta.shape
  theta = np.where(valid, theta, 0.0)
  mats = np.zeros((rows, c, 2, 2))
  mats[..., 0, 0] = np.where(valid, 1.0 - alpha, 1.0)
  mats[..., 0, 1] = np.where(valid, eta, 0.0)
  mats[..., 1, 1] = np.where(valid, eta, 1.0)

  def product(r, t, j):   # M_t ... M_{j+1}; j = -1 is the chunk-start state
    out = np.eye(2)
    for i in range(j + 1, t + 1):
      out = mats[r, i] @ out
    return out

  w_w0, w_s0, w_x = np.zeros((rows, c)), np.zeros((rows, c)), np.zeros((rows, c, c))
  s_s0, s_x = np.zeros(rows), np.zeros((rows, c))
  for r in range(rows):
    for t in range(c):
      start = product(r, t, -1)
      w_w0[r, t], w_s0[r, t] = start[0, 0], start[0, 1]
      for j in range(t + 1):
        m = product(r, t, j)
        w_x[r, t, j] = (m[0, 0] + m[0, 1]) * -theta[r, j]
    end = product(r, c - 1, -1)
    s_s0[r] = end[1, 1]
    for j in range(c):
      s_x[r, j] = product(r, c - 1, j)[1, 1] * -theta[r, j]
  return w_w0, w_s0, w_x, s_s0, s_x


class GateCoefficientsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    jax.config.update("jax_enable_x64", True)
    self.addCleanup(jax.config.update, "jax_enable_x64", False)

  def _gates(self, chunk, seed):
    k = jax.random.split(jax.random.key(seed), 3)
    theta, eta, alpha = (np.array(jax.random.uniform(ki, (3, chunk), jnp.float64))
                         for ki in k)
    eta[0, 1], alpha[1, 2] = 0.0, 1.0     # gates of exactly 0 and 1 must stay exact
    valid = np.arange(chunk)[None, :] < np.array([[chunk], [chunk], [chunk - 2]])
    return theta, eta, alpha, valid

  @parameterized.parameters(4, 16, transitions.SEQUENTIAL_MAX_CHUNK + 8)
  def test_both_reads_equal_literal_products(self, chunk):
    theta, eta, alpha, valid = self._gates(chunk, seed=chunk)
    w_w0, w_s0, w_x, s_s0, s_x = literal_coefficients(theta, eta, alpha, valid)
    cum = transitions.gate_coefficients(jnp.asarray(theta), jnp.asarray(eta), jnp.asarray(alpha),
                                        jnp.asarray(valid), "cumulative")
    chex.assert_trees_all_close((cum.w_from_w0, cum.w_from_s0, cum.w_from_x, cum.s_from_s0,
                                 cum.s_from_x), (w_w0, w_s0, w_x, s_s0, s_x), atol=1e-12)
    end = transitions.gate_coefficients(jnp.asarray(theta), jnp.asarray(eta), jnp.asarray(alpha),
                                        jnp.asarray(valid), "chunk_start")
    chex.assert_trees_all_close((end.w_from_w0, end.w_from_s0, end.w_from_x, end.s_from_s0,
                                 end.s_from_x),
                                (w_w0[:, -1], w_s0[:, -1], w_x[:, -1], s_s0, s_x), atol=1e-12)

  @parameterized.parameters("cumulative", "chunk_start")
  def test_unrolled_path_equals_scan_with_gradients(self, read):
    theta, eta, alpha, valid = self._gates(16, seed=3)

    def loss(theta, eta, alpha):
      coefs = transitions.gate_coefficients(theta, eta, alpha, jnp.asarray(valid), read)
      return sum(jnp.sum(jnp.sin(3.0 * x)) for x in coefs)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    unrolled = grad(theta, eta, alpha)
    default = transitions.SEQUENTIAL_MAX_CHUNK
    transitions.SEQUENTIAL_MAX_CHUNK = 0
    try:
      scanned = grad(theta, eta, alpha)
    finally:
      transitions.SEQUENTIAL_MAX_CHUNK = default
    chex.assert_trees_all_close(unrolled, scanned, atol=1e-12, rtol=1e-12)


if __name__ == "__main__":
  absltest.main()
