"""LoRA as a separate param tree: init, application inside the forward pass, merge.

The LoRA tree mirrors the stacked layer params: {target: {"a": [L, *in, R], "b": [L, R, *out]}}
with the in/out letters of `config.PROJECTIONS` (q: D -> NH, o: NH -> D, ...). The update is
W + (alpha / rank) * A @ B, B starts at zero (PEFT's init), dropout acts on the LoRA input only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from single_multi.models.config import PROJECTIONS, ModelConfig, dim_sizes

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Reference defaults (single-multi paper): r=64, alpha=16, dropout 0.1 on q/k/v/o."""

  rank: int = 64
  alpha: float = 16.0
  dropout: float = 0.1
  targets: tuple[str, ...] = ("q", "k", "v", "o")

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown:
      raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}")
    if self.rank <= 0:
      raise ValueError(f"LoRA rank must be positive, got {self.rank}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@flax.struct.dataclass
class LoraState:
  """LoRA params plus what applying them needs; a pytree, so it can cross `jax.jit`.

  rng: dropout key (training); None means deterministic (eval, decoding).
  """

  params: dict[str, Any]
  config: LoraConfig = flax.struct.field(pytree_node=False)
  rng: jax.Array | None = None

  def for_layer(self, layer_params: dict[str, Any], layer_index: jax.Array) -> "LoraState":
    rng = None if self.rng is None else jax.random.fold_in(self.rng, layer_index)
    return LoraState(layer_params, self.config, rng)

  def delta(self, name: str, x: jax.Array, ins: str, outs: str) -> jax.Array:
    """(alpha/r) * dropout(x) @ A @ B for one layer's projection `name`."""
    p = self.params[name]
    if self.rng is not None and self.config.dropout > 0:
      keep = 1.0 - self.config.dropout
      key = jax.random.fold_in(self.rng, TARGETS.index(name))
      x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0).astype(x.dtype)
    low = jnp.einsum(f"BT{ins},{ins}R->BTR", x, p["a"].astype(x.dtype))
    return self.config.scale * jnp.einsum(f"BTR,R{outs}->BT{outs}", low, p["b"].astype(x.dtype))


def init(model_config: ModelConfig, lora_config: LoraConfig, rng: jax.Array,
         dtype=jnp.float32) -> dict[str, Any]:
  """A ~ kaiming-uniform (PEFT's a=sqrt(5), i.e. U(+-1/sqrt(fan_in))), B = 0."""
  dims = dim_sizes(model_config)
  L, R = model_config.num_layers, lora_config.rank
  out = {}
  for i, name in enumerate(lora_config.targets):
    ins, outs = PROJECTIONS[name]
    in_shape = tuple(dims[c] for c in ins)
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    bound = fan_in ** -0.5
    a = jax.random.uniform(jax.random.fold_in(rng, i), (L, *in_shape, R), jnp.float32, -bound, bound)
    out[name] = {"a": a.astype(dtype),
                 "b": jnp.zeros((L, R, *(dims[c] for c in outs)), dtype)}
  return out


def merge(params: dict[str, Any], lora_params: dict[str, Any], lora_config: LoraConfig) -> dict:
  """Full params with W + (alpha/r) A @ B folded in (computed in fp32, cast to W's dtype)."""
  layers = dict(params["layers"])
  for name, p in lora_params.items():
    ins, outs = PROJECTIONS[name]
    delta = jnp.einsum(f"L{ins}R,LR{outs}->L{ins}{outs}", p["a"].astype(jnp.float32),
                       p["b"].astype(jnp.float32))
    w = layers[name]
    layers[name] = (w.astype(jnp.float32) + lora_config.scale * delta).astype(w.dtype)
  return {**params, "layers": layers}
