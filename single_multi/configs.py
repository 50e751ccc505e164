"""Helpers for config files (loaded by path, as `config_flags` does)."""

from __future__ import annotations

import importlib.util
import pathlib


def load(path: str | pathlib.Path, relative_to: str | pathlib.Path | None = None):
  """`get_config()` of the config file `path` (relative to the directory of `relative_to`, a
  config file's `__file__`, when given): how one config builds on another."""
  path = pathlib.Path(path)
  if relative_to is not None:
    path = pathlib.Path(relative_to).resolve().parent / path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
