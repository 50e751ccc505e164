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


def check_round_without_training_rows(config, pool, tmp_path, stdout, answer_field):
  """Runs `config` (with the correctness filter on) on random members, which answer no dev row
  right, and checks that round 1 distilled nothing and went on: the premise (no correct dev
  answer), the round's record and warning, and every member's test answers (`answer_field` of
  its records) the same in round 1 as in round 0. stdout() returns what the run printed."""
  import json

  from single_multi import evolve
  history = evolve.run(config, tmp_path, pool, progress=False)
  dev = [json.loads(line) for line in
         (tmp_path / "round_1" / "collaboration_dev" / "records.jsonl").read_text().splitlines()]
  assert dev and not any(r["score"] > 0 for r in dev)  # The premise: nothing to keep.
  assert history[1]["distill"] == {"skipped": "no training rows", "steps": 0}
  assert "round 1: distillation skipped, no training rows" in stdout()

  def answers(r):
    lines = (tmp_path / f"round_{r}" / "singles" / "records.jsonl").read_text().splitlines()
    return {(x["model"], x["id"]): x[answer_field] for x in map(json.loads, lines)}
  assert answers(1) == answers(0)
