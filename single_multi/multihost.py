"""Multi-process runs (TPU pod slices, multi-host GPU, N local CPU processes with gloo).

Every process runs the same program (`sharding.initialize_distributed` first). The loop splits
its work as follows:
  * evaluation and collaboration: each process decodes its shard of the examples
    (`pipeline.*_batches(shard=...)`) with process-local programs; the records are all-gathered,
    so every process holds the same results;
  * distillation: on the config's mesh over every device of every process, the arrays placed by
    the sharding rules (`distill.Placement`; a data-only mesh, the default `data_mesh`, replicates
    params and optimizer states and splits each step's rows), collectives by XLA (gloo on CPU);
    the distilled params are gathered back to every process;
  * files (records, metrics, plots) are written by process 0; Orbax checkpoints by all together.
With one process and one device every helper is the identity.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P


def is_primary() -> bool:
  return jax.process_index() == 0


def allgather_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every process's JSON records, concatenated in process order, on every process."""
  if jax.process_count() == 1:
    return records
  data = np.frombuffer(json.dumps(records).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everything = np.asarray(multihost_utils.process_allgather(padded))
  out = []
  for p, n in enumerate(sizes.reshape(-1)):
    out.extend(json.loads(everything[p, :int(n)].tobytes()))
  return out


def data_mesh(rows_per_step: int) -> jax.sharding.Mesh | None:
  """The mesh with every device on its `data` axis when training should be data parallel: more than one
  device and the step's rows divide over them. None: train on the default device."""
  n = jax.device_count()
  if n == 1:
    return None
  if rows_per_step % n:
    if jax.process_count() > 1:
      raise ValueError(f"{rows_per_step} rows per optimizer step do not split over {n} devices "
                       f"in {jax.process_count()} processes; make distill.batch_size * "
                       "accumulation a multiple of the device count")
    return None
  from single_multi import sharding
  return sharding.make_mesh({"data": n})


def replicate(tree, mesh):
  """Host-identical values -> arrays replicated on every device of `mesh`."""
  return multihost_utils.host_local_array_to_global_array(
      jax.tree.map(np.asarray, tree), mesh, P())


def gather(tree):
  """Global arrays -> their full values on every process (numpy where an array spans processes);
  the identity with one process, where every array is addressable."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                      if isinstance(x, jax.Array) and not x.is_fully_addressable else x, tree)


def local(tree):
  """Replicated global arrays -> this process's copy (single-device arrays)."""
  return jax.tree.map(lambda x: x.addressable_data(0)
                      if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 else x, tree)


def sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
