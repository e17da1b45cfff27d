"""Update rules of the fast weights (SPEC §1.1, §1.4) and the per-token gates they read.

  gd     TTT: W_t = W_{t-1} - theta_t u_t                       (gates: theta)
  titans S_t = eta_t S_{t-1} - theta_t u_t; W_t = (1 - alpha_t) W_{t-1} + S_t
                                                                 (gates: theta, eta, alpha)
  lact   once per chunk: g = sum_i theta_i u_i; [m = beta m + g; g = m]; [g = NS5(g)];
         W = L2Normalise(W - g), each row rescaled to its norm before the update
                                                                 (gates: theta; eta if momentum)
where u_t is the gradient of the inner loss at the state of the start of t's chunk.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
RULE_KINDS = ("gd", "titans", "lact")
READ_MODES = ("cumulative", "chunk_start")
# Newton-Schulz quintic coefficients used by Muon (Jordan et al., 2024).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NORM_EPS = 1e-6


class Gates(NamedTuple):
  """Per-token, per-head gates, each [batch, time, heads]."""
  theta: Array                    # inner learning rate, >= 0
  eta: Optional[Array] = None     # momentum in [0, 1]
  alpha: Optional[Array] = None   # forgetting (weight decay) in [0, 1]


class MemoryState(NamedTuple):
  """The recurrent state: fast weights and, where the rule has one, their momentum."""
  weights: dict
  momentum: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class UpdateRule:
  kind: str = "titans"
  momentum: Optional[bool] = None  # lact only (default on): m = beta m + g, beta = chunk mean eta
  muon: bool = False               # lact only: orthogonalise the chunk update with Newton-Schulz
  ns_steps: int = 5

  def __post_init__(self):
    if self.kind not in RULE_KINDS:
      raise ValueError(f"update rule kind={self.kind!r} is unknown; expected one of {RULE_KINDS}")
    if self.kind != "lact" and (self.momentum is not None or self.muon):
      raise ValueError(f"momentum={self.momentum!r} and muon={self.muon!r} are options of "
                       f"rule='lact' only; rule={self.kind!r} fixes them (titans always carries "
                       "momentum, gd never)")
    if self.ns_steps < 1:
      raise ValueError(f"ns_steps={self.ns_steps} must be >= 1")

  @property
  def has_momentum(self) -> bool:
    return self.kind == "titans" or (self.kind == "lact" and self.momentum is not False)

  def required_gates(self) -> tuple[str, ...]:
    if self.kind == "titans":
      return ("theta", "eta", "alpha")
    if self.kind == "lact" and self.has_momentum:
      return ("theta", "eta")
    return ("theta",)


def newton_schulz(g_xOxI: Array, steps: int) -> Array:
  """Approximate U V^T of the SVD of each trailing [out, in] matrix (Muon's NS5)."""
  a, b, c = NS_COEFFS
  transpose = g_xOxI.shape[-2] > g_xOxI.shape[-1]
  x = jnp.swapaxes(g_xOxI, -1, -2) if transpose else g_xOxI
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
  x = x / (norm + NORM_EPS)
  for _ in range(steps):
    gram = x @ jnp.swapaxes(x, -1, -2)
    x = a * x + (b * gram + c * gram @ gram) @ x
  return jnp.swapaxes(x, -1, -2) if transpose else x


def _row_norm(w: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=-1, keepdims=True) + NORM_EPS**2)


def lact_update(weights: dict, momentum: Optional[dict], grad: dict, beta: Optional[Array],
                rule: UpdateRule) -> tuple[dict, Optional[dict]]:
  """One LaCT chunk update. Leaves are [..., out, in] ("w") or [..., out] ("b"); beta is [...]."""
  if rule.has_momentum:
    momentum = jax.tree.map(
        lambda m, g: beta.reshape(beta.shape + (1,) * (g.ndim - beta.ndim)) * m + g,
        momentum, grad)
    grad = momentum
  new_weights = {}
  for name, layer in weights.items():
    new_layer = {}
    for leaf, w in layer.items():
      g = grad[name][leaf]
      if leaf == "w":
        if rule.muon:
          g = newton_schulz(g, rule.ns_steps)
        w_new = w - g
        w_new = w_new * (_row_norm(w) / _row_norm(w_new))
      else:
        w_new = w - g
      new_layer[leaf] = w_new
    new_weights[name] = new_layer
  return new_weights, momentum
