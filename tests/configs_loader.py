"""Load a config file from configs/ the way config_flags does (by path)."""

import pathlib

from single_multi import configs

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str):
  return configs.load(CONFIGS / name)
