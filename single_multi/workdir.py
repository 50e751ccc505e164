"""A workdir belongs to one run and one config, and holds its checkpoints.

`check_workdir_config` records the run's config in `<workdir>/config.json` and refuses a resume
with another one; `WorkdirLock` keeps a second run out (`<workdir>/LOCK`: pid, host, start, a
heartbeat); `Checkpoints` is the Orbax manager of the loop's stages, with fingerprints of every
saved array verified at restore.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from ml_collections import config_dict

from single_multi import configs, multihost
from single_multi.configs import ConfigError


# Fields that do not change what a run computes: they may differ when a run resumes.
NOT_RESULTS = frozenset({"keep_checkpoints", "compile_topology", "compile_prompt_length",
                         "resume_allow", "eval_cache"})
# Fields that cannot change on resume even when allowed: the checkpoints' stage layout.
FIXED_ON_RESUME = frozenset({"fused_round"})


def check_workdir_config(config: config_dict.ConfigDict, workdir) -> list[str]:
  """Records the run's config in `<workdir>/config.json`, or, when the workdir already has one,
  refuses a config that differs from it (ConfigError with the changed fields) unless each changed
  field is listed in `config.resume_allow` (e.g. ("rounds",) to extend a finished run); the
  record is then updated. `fused_round` never changes under a run. Returns the accepted changes."""
  path = epath.Path(workdir) / "config.json"
  current = json.loads(config.to_json())
  if not path.exists():
    if multihost.is_primary():
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(current, indent=1))
    return []
  saved, now = configs.leaves(json.loads(path.read_text())), configs.leaves(current)
  changed = sorted(k for k in set(saved) | set(now)
                   if k not in NOT_RESULTS and saved.get(k) != now.get(k))
  allowed = set(config.get("resume_allow", ())) - FIXED_ON_RESUME
  refused = [k for k in changed if k not in allowed]
  if refused:
    diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in refused)
    fixed = [k for k in refused if k in FIXED_ON_RESUME]
    hint = (f" ({', '.join(fixed)} cannot change under a run: its checkpoints are laid out by "
            "it)" if fixed else f"; or allow them: --config.resume_allow='{tuple(refused)}'")
    raise ConfigError(f"{path} records another config; changed: {diff}. Resume with the saved "
                      f"config or use a new --workdir{hint}")
  if changed and multihost.is_primary():
    path.write_text(json.dumps(current, indent=1))
  return changed


class WorkdirLockedError(RuntimeError):
  pass


_HELD: dict[str, int] = {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`<workdir>/LOCK`: {pid, host, started, heartbeat}. A second run is refused while the holder
  lives (same host: its pid exists; another host, as on a bucket: its heartbeat, renewed after
  every stage, is younger than `stale_seconds`); a lock whose holder is gone is taken over.
  Re-entrant within the holding process. Local disks create it atomically (O_EXCL); buckets have
  no atomic create, so the writer re-reads it to confirm it won."""

  def __init__(self, workdir, stale_seconds: float = 3600.0):
    self.path = epath.Path(workdir) / "LOCK"
    self.stale_seconds = stale_seconds
    self.me = {"pid": os.getpid(), "host": socket.gethostname()}

  @property
  def depth(self) -> int:  # Acquisitions of this workdir's lock held in this process.
    return _HELD.get(str(self.path), 0)

  @depth.setter
  def depth(self, value: int) -> None:
    _HELD[str(self.path)] = value

  def _mine(self, holder: dict[str, Any] | None) -> bool:
    return bool(holder) and all(holder.get(k) == v for k, v in self.me.items())

  def _holder(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # Unreadable: a torn write of a dead run; taken over.

  def _live(self, holder: dict[str, Any]) -> bool:
    if not holder:
      return False
    if holder.get("host") == self.me["host"]:
      return _alive(int(holder.get("pid", -1)))
    return time.time() - float(holder.get("heartbeat", 0)) < self.stale_seconds

  def _write(self, started: float, exclusive: bool) -> None:
    data = json.dumps({**self.me, "started": started, "heartbeat": time.time()})
    if exclusive and "://" not in str(self.path):
      fd = os.open(str(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      with os.fdopen(fd, "w") as f:
        f.write(data)
    else:
      self.path.write_text(data)

  def __enter__(self):
    if self.depth:
      self.depth += 1
      return self
    self.path.parent.mkdir(parents=True, exist_ok=True)
    holder = self._holder()
    if self._mine(holder):
      pass  # Ours already (an earlier acquisition in this process that was not released).
    elif holder is not None and self._live(holder):
      started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
      raise WorkdirLockedError(
          f"{self.path.parent} is in use by pid {holder.get('pid')} on {holder.get('host')} "
          f"(started {started}); wait for it to finish or use another --workdir. A lock whose "
          f"run is gone is taken over by the next run ({self.path})")
    else:
      if holder is not None:
        logging.warning("taking over the stale lock %s (%s)", self.path, holder)
        self.path.unlink()
      try:
        self._write(time.time(), exclusive=True)
      except FileExistsError:  # Another run created it between our look and our write.
        return self.__enter__()
      if not self._mine(self._holder()):
        return self.__enter__()  # A bucket writer lost the race: look again.
    self.depth = 1
    return self

  def heartbeat(self) -> None:
    if self.depth:
      started = (self._holder() or {}).get("started", time.time())
      self._write(started, exclusive=False)

  def __exit__(self, *exc):
    self.depth -= 1
    if self.depth == 0:
      if self._mine(self._holder()):
        self.path.unlink()
    return False


def workdir_lock(workdir):
  """The workdir's lock, taken by process 0 only (the others run under its hold)."""
  return WorkdirLock(workdir) if multihost.is_primary() else contextlib.nullcontext()


# -------------------------------------------------------------------------------------------------
# Checkpoints.


class CheckpointError(RuntimeError):
  """A checkpoint directory cannot be restored; the message names it and the way out."""


@jax.jit
def _fingerprints(tree):
  """Per leaf two uint32 checksums of its bits: their sum and their position-weighted sum, both
  modulo 2^32 (integer sums: the same whatever the layout or sharding). Both sums are one
  variadic reduction, which XLA fuses with the bit cast: two separate sums made XLA:CPU write the
  bits out first (temporaries twice the tree's size: +2.2 GB of RSS for 1.1 GB of params, which
  raised the embedded default's peak RSS from 6.75 to 8.49 GB once evaluations were keyed by
  their params, `eval_memo`)."""
  def one(x):
    x = jnp.asarray(x)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32).reshape(-1)
    elif width is None:  # 8-byte values: both halves.
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
      bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).reshape(-1)
    index = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    zero = jnp.zeros((), jnp.uint32)
    total, weighted = jax.lax.reduce((bits, bits * index), (zero, zero),
                                     lambda a, b: (a[0] + b[0], a[1] + b[1]), (0,))
    return jnp.stack([total, weighted])
  return jax.tree.map(one, tree)


def fingerprints(tree) -> dict[str, list[int]]:
  """{leaf path: [sum, weighted sum]} of a pytree's bits (`_fingerprints`), JSON-ready."""
  values = jax.device_get(_fingerprints(tree))
  return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(leaf)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(values)[0]}


class Checkpoints:
  """Orbax CheckpointManager: one step per finished stage (its index in `stage_list`), items
  params (the pool), arrays (the stage's outputs) and meta (round, stage, history, config, and
  the fingerprints of params and arrays, checked at restore: a damaged file is named, not
  restored)."""

  def __init__(self, directory, keep: int):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.mesh = None
    if jax.process_count() > 1:
      from single_multi import sharding
      self.mesh = sharding.make_mesh({"data": -1})
    self.manager = ocp.CheckpointManager(
        epath.Path(directory), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    # Orbax copies the arrays to host memory before writing them in the background. On CPU that
    # copy sits in the same memory as the next stage's buffers (the embedded default's peak RSS
    # came at a stage start while the previous stage's 1.5 GiB save was being written), so there a
    # save is finished before the loop goes on; on accelerators it overlaps the next stage.
    self.wait = jax.default_backend() == "cpu"
    self.failed = False  # A write failed (its CheckpointError raised): `close` raises no more.

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, index: int, params, arrays: dict[str, np.ndarray], meta: dict[str, Any]):
    ocp = self._ocp
    arrays = arrays or {"_empty": np.zeros((1,), np.int32)}
    if self.mesh is not None:  # Several processes: one replicated global array per leaf.
      params = multihost.replicate(params, self.mesh)
    meta = dict(meta, fingerprints={"params": fingerprints(params),
                                    "arrays": fingerprints(arrays)})
    if not self.wait and self.manager.is_saving_in_progress():  # The last write's error first.
      self._wait(self.manager.latest_step())
    try:
      self.manager.save(index, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), arrays=ocp.args.StandardSave(arrays),
          meta=ocp.args.JsonSave(meta)))
    except OSError as e:  # Disk full, permissions, a vanished bucket: the step is not committed.
      raise self._write_error(index, e) from e
    if self.wait:
      self._wait(index)

  def _wait(self, index):
    """Waits for the background write; its failure is the loop's one CheckpointError. Orbax
    re-raises the writer thread's error as is: an OSError, or tensorstore's ValueError
    ("RESOURCE_EXHAUSTED ... No space left on device" on a full disk)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self.failed = True
      raise self._write_error(index, e) from e

  def _write_error(self, index, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot write checkpoint {index} in {self.manager.directory}: {type(e).__name__}: "
        f"{str(e)[:300]}. Nothing of that stage was committed; free space (or fix the path) and "
        "rerun the same command: it resumes after the last finished stage.")

  def restore(self, index: int, abstract_params):
    ocp = self._ocp
    if self.mesh is not None:
      everywhere = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      abstract_params = jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=everywhere), abstract_params)
    try:
      out = self.manager.restore(index, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params), arrays=ocp.args.StandardRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises several types for damaged or foreign directories.
      raise CheckpointError(
          f"cannot restore checkpoint {index} in {self.manager.directory}: "
          f"{type(e).__name__}: {str(e)[:300]}. It is damaged or from another pool/config; "
          "delete that step's directory to resume from the one before, or use a new --workdir."
      ) from e
    saved = out["meta"].get("fingerprints")
    if saved is not None:
      for item in ("params", "arrays"):
        now = fingerprints(out[item])
        bad = [k for k in saved[item] if now.get(k) != saved[item][k]]
        if bad:
          raise CheckpointError(
              f"checkpoint {index} in {self.manager.directory}: {item} {', '.join(bad[:3])}"
              f"{' ...' if len(bad) > 3 else ''} differ from the fingerprints saved with them: "
              "the files are damaged. Delete that step's directory to resume from the one "
              "before, or use a new --workdir.")
    arrays = {k: np.asarray(v) for k, v in out["arrays"].items() if k != "_empty"}
    return multihost.local(out["params"]), arrays, out["meta"]

  def close(self):
    """Waits for the last write (an asynchronous write's error surfaces here, or at the next
    save) and closes the manager. After a write already failed (`failed`), nothing raises again:
    the loop's first CheckpointError is the one the user sees."""
    try:
      if not self.failed:
        self._wait(self.manager.latest_step())
    finally:
      try:
        self.manager.close()
      except Exception:
        if not self.failed:
          raise
        logging.warning("closing the checkpoint manager after a failed write", exc_info=True)
