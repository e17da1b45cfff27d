"""Deep memory models f(W; x): the small networks whose weights are the recurrent state.

A model is a frozen dataclass that knows three things:
  * the shapes of its fast weights (a per-head pytree `{layer: {"w": [out, in], "b": [out]}}`),
  * its slow (outer, never updated at test time) parameters, e.g. the TTT LayerNorm scale,
  * `apply(dense, slow, x)`: the forward pass written against an abstract `dense(layer, x)`.

Writing the forward pass against `dense` is the one mechanism every path shares: the token-level
reference plugs in `x @ W.T + b`, the chunkwise op plugs in the dual form (state at chunk start plus
the chunk's outer-product updates), and per-token gradients come from perturbing each dense output.
Every fast-weight matrix therefore gets gradients of the form `delta a^T` (bias: `delta`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from tnt_jax.spec_strings import parse_fields

Array = jax.Array
Dense = Callable[[str, Array], Array]
FastWeights = dict  # {layer: {"w": [..., out, in], "b": [..., out]}}

ACTIVATIONS: Mapping[str, Callable[[Array], Array]] = {
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}
MODEL_KINDS = ("linear", "mlp", "swiglu")
LAYERNORM_EPS = 1e-6


def layer_norm(x: Array, scale: Array, offset: Array) -> Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + LAYERNORM_EPS) * scale + offset


def _bool(value: str) -> bool:
  if value.lower() not in ("true", "false", "1", "0"):
    raise ValueError(value)
  return value.lower() in ("true", "1")


_SPEC_FIELDS = {"depth": (int, "an integer"), "expansion": (float, "a float"),
                "activation": (str, "a name"), "residual_norm": (_bool, "a bool"),
                "bias": (_bool, "a bool")}


@dataclasses.dataclass(frozen=True)
class MemoryModel:
  """A deep memory model (SPEC §1).

  kind: "linear" (f = W x), "mlp" (depth >= 2, hidden = expansion * d) or "swiglu" (LaCT:
    W2 [silu(W1 x) * (W3 x)], hidden = expansion * d).
  residual_norm: TTT form x + LN(g(x)); the LayerNorm scale/offset are slow per-head parameters.
  bias: give every dense layer a fast bias (TTT-Linear uses x + LN(W x + b)).
  """

  kind: str = "mlp"
  depth: int = 2
  expansion: float = 4.0
  activation: str = "gelu"
  residual_norm: bool = False
  bias: bool = False

  def __post_init__(self):
    if self.kind not in MODEL_KINDS:
      raise ValueError(f"memory model kind={self.kind!r} is unknown; expected one of {MODEL_KINDS}")
    if self.kind == "mlp" and self.depth < 2:
      raise ValueError(f"an mlp memory needs depth >= 2, got depth={self.depth}")
    if self.expansion <= 0:
      raise ValueError(f"expansion={self.expansion} must be > 0")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is unknown; expected one of "
                       f"{tuple(ACTIVATIONS)}")

  @classmethod
  def from_spec(cls, spec: str) -> "MemoryModel":
    """A model from a string, for flags and config files: the kind, then field=value entries,
    joined by "+": "linear", "mlp" (2 layers, expansion 4, gelu: Titans'), "mlp+expansion=2",
    "swiglu+expansion=1". An unknown kind, field or value raises ValueError naming it."""
    kind, *entries = str(spec).split("+")
    fields = parse_fields(entries, _SPEC_FIELDS, f"memory model spec {spec!r}")
    return cls(kind=kind, **fields)

  def hidden_dim(self, head_dim: int) -> int:
    return max(1, int(math.floor(self.expansion * head_dim + 0.5)))   # round half up

  def layer_shapes(self, head_dim: int) -> dict[str, tuple[int, int]]:
    """Ordered {layer name: (out, in)} of the dense layers."""
    d, h = head_dim, self.hidden_dim(head_dim)
    if self.kind == "linear":
      return {"w0": (d, d)}
    if self.kind == "swiglu":
      return {"w1": (h, d), "w3": (h, d), "w2": (d, h)}
    dims = [d] + [h] * (self.depth - 1) + [d]
    return {f"w{i}": (dims[i + 1], dims[i]) for i in range(self.depth)}

  def init_fast_weights(self, key: Array, num_heads: int, head_dim: int,
                        dtype=jnp.float32) -> FastWeights:
    """Learned initial state W_init: [num_heads, out, in] per layer (+ zero biases)."""
    weights = {}
    shapes = self.layer_shapes(head_dim)
    for layer_key, (name, (out_dim, in_dim)) in zip(jax.random.split(key, len(shapes)),
                                                    shapes.items()):
      w = jax.random.normal(layer_key, (num_heads, out_dim, in_dim), dtype) / math.sqrt(in_dim)
      weights[name] = {"w": w}
      if self.bias:
        weights[name]["b"] = jnp.zeros((num_heads, out_dim), dtype)
    return weights

  def init_slow_params(self, num_heads: int, head_dim: int, dtype=jnp.float32) -> dict:
    """Outer parameters of f that test-time learning does not touch: [num_heads, d] each."""
    if not self.residual_norm:
      return {}
    return {"ln_scale": jnp.ones((num_heads, head_dim), dtype),
            "ln_offset": jnp.zeros((num_heads, head_dim), dtype)}

  def apply(self, dense: Dense, slow: dict, x: Array) -> Array:
    """f(W; x) for x [..., d]; `dense(name, x)` applies fast layer `name` to x."""
    act = ACTIVATIONS[self.activation]
    if self.kind == "linear":
      y = dense("w0", x)
    elif self.kind == "swiglu":
      y = dense("w2", jax.nn.silu(dense("w1", x)) * dense("w3", x))
    else:
      y = x
      names = list(self.layer_shapes(x.shape[-1]))
      for i, name in enumerate(names):
        y = dense(name, y)
        if i < len(names) - 1:
          y = act(y)
    if self.residual_norm:
      y = x + layer_norm(y, slow["ln_scale"], slow["ln_offset"])
    return y


def plain_dense(weights: FastWeights) -> Dense:
  """dense() for one head's unbatched weights: x [..., in] -> [..., out]."""

  def dense(name: str, x: Array) -> Array:
    layer = weights[name]
    y = x @ layer["w"].T
    return y + layer["b"] if "b" in layer else y

  return dense
