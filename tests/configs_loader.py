"""Load a config file from configs/ the way config_flags does (by path); run its --dry_run."""

import os
import pathlib
import subprocess
import sys

from single_multi import configs

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str, **overrides):
  """configs/<name>, with overrides by dotted field ("distill.method": ...)."""
  c = configs.load(CONFIGS / name)
  for k, v in overrides.items():
    target = c
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


def dry_run_stdout(name: str) -> str:
  """`single_multi.main --config=configs/<name> --dry_run` on 8 fake CPU devices: its stdout."""
  root = CONFIGS.parent
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "single_multi.main", f"--config=configs/{name}",
                         "--dry_run"], cwd=root, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def killed_and_resumed(config, pool, tmp_path):
  """Per stage k but the last: (k, workdir, history) of a run killed after stage k
  (`evolve.run(stop_after=k)`), then rerun with the same arguments."""
  import pytest
  from single_multi import evolve
  for k in range(len(evolve.stage_list(config.rounds, config.fused_round)) - 1):
    workdir = tmp_path / f"killed_{k}"
    with pytest.raises(evolve.Interrupted):
      evolve.run(config, workdir, pool, progress=False, stop_after=k)
    yield k, workdir, evolve.run(config, workdir, pool, progress=False)
