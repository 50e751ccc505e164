"""Meshes, the one table of logical-axis rules, sharded params, activation constraints, multi-host.

Every array dimension has a logical name (params get theirs from the shape letters of
`transformer.param_layout`); RULES maps logical names to mesh axes. A dimension is sharded over the
longest prefix of its rule's mesh axes that (a) are not already used by another dimension of the
same array and (b) divide it; otherwise it stays replicated. So one table serves any mesh shape,
size-1 axes included, and a model whose head count does not divide the tensor axis still runs.

Mesh axes: model (the pool axis), data, fsdp, tensor.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from single_multi.models.config import PROJECTIONS, ModelConfig, dim_sizes, param_layout

MESH_AXES = ("model", "data", "fsdp", "tensor")

# logical name -> mesh axes, in order of preference. THE table; nothing else maps axes.
RULES: dict[str, tuple[str, ...]] = {
    # Parameters.
    "pool": ("model",),
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "lora_rank": ("fsdp",),  # LoRA B [R, out] has no embed dim: shard its rank instead.
    "labels": (),  # A sequence classifier's few outputs.
    # Activations and caches.
    "batch": ("data", "fsdp"),
    "seq": (),
    "cache_seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}

# Shape letters of the param layout -> logical names.
LETTERS = {"V": "vocab", "D": "embed", "N": "heads", "K": "kv_heads", "H": "head_dim",
           "F": "mlp", "L": "layers", "C": "labels"}


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None):
  """A mesh over all devices from {axis: size}; one size may be -1 (the rest of the devices)."""
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; choose from {MESH_AXES}")
  devices = list(devices if devices is not None else jax.devices())
  sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by the fixed axes' product {known}")
    sizes[free[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, "
                     f"there are {len(devices)}")
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES, devices=devices,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec(shape: Sequence[int], names: Sequence[str | None], mesh_shape: Mapping[str, int]
         ) -> PartitionSpec:
  """PartitionSpec of an array with logical dimension `names` on a mesh of `mesh_shape`."""
  if len(shape) != len(names):
    raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims but {len(names)} names {names}")
  used: set[str] = set()
  out = []
  for size, name in zip(shape, names):
    if name is not None and name not in RULES:
      raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
    chosen: list[str] = []
    for axis in RULES.get(name, ()) if name else ():
      n = mesh_shape.get(axis, 1)
      if n == 1 or axis in used or size % (math.prod(mesh_shape[a] for a in chosen) * n):
        continue
      chosen.append(axis)
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*out)


def param_names(config: ModelConfig, pool: bool = False) -> dict[str, Any]:
  """Logical names of every param dim (with a leading 'pool' axis for a stacked pool)."""
  prefix = ("pool",) if pool else ()
  return jax.tree.map(lambda letters: prefix + tuple(LETTERS[c] for c in letters),
                      param_layout(config))


def param_shardings(config: ModelConfig, mesh, pool_size: int | None = None) -> dict[str, Any]:
  sizes = dim_sizes(config)
  prefix = () if pool_size is None else (pool_size,)
  mesh_shape = dict(mesh.shape)

  def one(letters, names):
    return NamedSharding(mesh, spec(prefix + tuple(sizes[c] for c in letters), names, mesh_shape))

  return jax.tree.map(one, param_layout(config), param_names(config, pool_size is not None))


def lora_shardings(config: ModelConfig, lora_cfg, mesh, pool_size: int | None = None):
  """Shardings of a LoRA tree (`lora.init`'s structure; a leading pool axis when pool_size)."""
  sizes = dim_sizes(config) | {"R": lora_cfg.rank}
  prefix = () if pool_size is None else (pool_size,)
  out = {}
  for name in lora_cfg.targets:
    ins, outs = PROJECTIONS[name]
    out[name] = {}
    for part, letters in (("a", "L" + ins + "R"), ("b", "LR" + outs)):
      names = (("pool",) if prefix else ()) + tuple("lora_rank" if c == "R" else LETTERS[c]
                                                    for c in letters)
      out[name][part] = named(mesh, prefix + tuple(sizes[c] for c in letters), names)
  return out


def opt_state_shardings(optimizer, opt_state, param_shardings_tree, mesh):
  """Shardings of an optax state (arrays or ShapeDtypeStructs): every moment is placed like the
  param it tracks, everything else (step counts) replicated."""
  everywhere = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(optimizer, lambda _, sh: sh, opt_state, param_shardings_tree,
                               transform_non_params=lambda _: everywhere)


def rows(mesh, shape: Sequence[int], pool: bool = False) -> NamedSharding:
  """Sharding of a batch of rows [(N,) B, T, ...]: rows over the batch axes (and the pool axis)."""
  names = (("pool",) if pool else ()) + ("batch", "seq")
  return named(mesh, shape, names + (None,) * (len(shape) - len(names)))


def named(mesh, shape: Sequence[int], names: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, spec(shape, names, dict(mesh.shape)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under `jax.set_mesh`; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(x.shape, names, dict(mesh.shape)))


def put(tree, shardings):
  """Places arrays onto their shardings. One process: `jax.device_put` (an array already on the
  mesh is resharded in place). Several: from values identical on every process, each supplying
  only the shards it owns (`make_array_from_callback`)."""
  def one(x, sharding):
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)


def init_params(config: ModelConfig, rng: jax.Array, mesh, dtype=np.float32):
  """Random params created directly sharded (`jit(out_shardings=...)`): no device ever holds the
  whole model. `jax.eval_shape` of the same function gives the plan without allocating."""
  from single_multi.models import transformer  # transformer imports this module.

  init = jax.jit(lambda key: transformer.init_params(config, key, dtype),
                 out_shardings=param_shardings(config, mesh))
  return init(rng)


def cache_shardings(config: ModelConfig, mesh, batch: int, max_len: int) -> dict[str, Any]:
  L, K, H = config.num_layers, config.num_kv_heads, config.head_dim  # See transformer.init_cache.
  k = named(mesh, (L, batch, K, H, max_len), ("layers", "batch", "act_heads", "head_dim",
                                              "cache_seq"))
  v = named(mesh, (L, batch, K, max_len, H), ("layers", "batch", "act_heads", "cache_seq",
                                              "head_dim"))
  return {"k": k, "v": v, "pos": named(mesh, (batch, max_len), ("batch", "cache_seq")),
          "end": named(mesh, (), ())}


def bytes_per_device(tree) -> dict[str, int]:
  """Bytes of `tree` (arrays or ShapeDtypeStructs with shardings) on each device."""
  out: dict[str, int] = {}
  for x in jax.tree.leaves(tree):
    sharding = x.sharding
    shard_shape = sharding.shard_shape(x.shape)
    nbytes = math.prod(shard_shape) * np.dtype(x.dtype).itemsize
    for d in sharding.device_set:
      out[str(d)] = out.get(str(d), 0) + nbytes
  return out


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           cpu_collectives: str = "gloo") -> None:
  """`jax.distributed.initialize`, with gloo collectives when the backend is CPU.

  On TPU pods and most GPU clusters the arguments are discovered from the environment; pass them
  for a hand-launched cluster or for N local CPU processes (tests). Call before any JAX op.
  """
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
