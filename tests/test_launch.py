"""Launchers: TPU / GPU command structure (dry runs, and a TPU run against a stub gcloud), and
the local multi-process launcher running the tiny config for real (== one process)."""

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

from configs_loader import load_config

from single_multi import launch, main

ROOT = pathlib.Path(__file__).parent.parent
TPU = dict(name="sm", zone="us-east5-a", accelerator="v5p-32", config="configs/mmlu.py",
           workdir="gs://bucket/run")


def _gcloud(cmd):
  return cmd[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]


def test_tpu_commands_discovered_coordinator():
  cmds = launch.tpu_commands(**TPU, extra=["--config.rounds=3"], delete=True)
  verbs = [c[4] if _gcloud(c) else c[0] for c in cmds]
  assert verbs == ["create", "tar", "scp", "ssh", "ssh", "delete"]
  create = cmds[0]
  assert "--accelerator-type=v5p-32" in create and "--zone=us-east5-a" in create
  assert all("--worker=all" in c for c in cmds if _gcloud(c) and c[4] in ("scp", "ssh"))
  run = shlex.split(cmds[4][-1].removeprefix("--command="))
  main = run[run.index("python3"):]
  assert main[:3] == ["python3", "-m", "single_multi.main"]
  assert {"--config=configs/mmlu.py", "--workdir=gs://bucket/run", "--config.rounds=3",
          "--distributed"} <= set(main)
  assert "jax[tpu]" in cmds[3][-1]
  with pytest.raises(ValueError, match="bucket"):
    launch.tpu_commands(**{**TPU, "workdir": "/tmp/run"})


def test_tpu_explicit_coordinator_runs_every_worker_with_its_id_against_a_stub_gcloud(
    tmp_path, monkeypatch):
  """The real launcher (no dry run) with `gcloud` replaced by a stub that logs its argv: the
  shell quoting holds and every worker gets worker 0's address and its own process id."""
  bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.jsonl"
  bin_dir.mkdir()
  stub = bin_dir / "gcloud"
  stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                  f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                  "if 'describe' in sys.argv: print('10.1.2.3')\n")
  stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
  src = tmp_path / "src"
  src.mkdir()
  (src / "marker.txt").write_text("x")
  monkeypatch.chdir(src)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  launch.cli("tpu", ["--name=sm", "--zone=z1", "--accelerator=v4-16", "--num_hosts=2",
                     "--config=configs/bbh.py", "--workdir=gs://b/r", "--config.rounds=2"])
  calls = [json.loads(line) for line in log.read_text().splitlines()]
  assert [c[3] for c in calls[:4]] == ["create", "scp", "ssh", "describe"]
  workers = sorted((c for c in calls[4:]), key=lambda c: c)
  assert len(workers) == 2
  for i, c in enumerate(sorted(workers, key=lambda c: [a for a in c if a.startswith("--worker")])):
    assert f"--worker={i}" in c
    remote = shlex.split([a for a in c if a.startswith("--command=")][0][len("--command="):])
    assert "--coordinator_address=10.1.2.3:8476" in remote, remote
    assert f"--process_id={i}" in remote and "--num_processes=2" in remote
    assert "--config.rounds=2" in remote and "--workdir=gs://b/r" in remote
  assert "marker.txt" in subprocess.run(["tar", "tzf", "/tmp/single_multi.tar.gz"],
                                        capture_output=True, text=True, check=True).stdout


def test_gpu_commands_and_dry_run_prints_them(capsys):
  one = launch.gpu_commands(hosts=["localhost"], config="c.py", workdir="/w")
  assert len(one) == 1 and one[0][-4:] == ["-m", "single_multi.main", "--config=c.py",
                                          "--workdir=/w"]
  many = launch.gpu_commands(hosts=["g0", "g1", "g2"], config="c.py", workdir="gs://b/w",
                             port=999)
  assert [c[:2] for c in many] == [["ssh", "g0"], ["ssh", "g1"], ["ssh", "g2"]]
  for i, c in enumerate(many):
    remote = shlex.split(shlex.split(c[2])[-1])
    assert {"--coordinator_address=g0:999", "--num_processes=3", f"--process_id={i}",
            "--workdir=gs://b/w"} <= set(remote)
  launch.cli("gpu", ["--hosts=g0,g1", "--config=c.py", "--workdir=/w", "--dry_run",
                     "--config.rounds=1"])
  printed = capsys.readouterr().out.strip().splitlines()
  assert len(printed) == 2 and all("--config.rounds=1" in p for p in printed)


def _metrics(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _records(workdir):
  return {str(f.relative_to(workdir)): f.read_text()
          for f in sorted(workdir.glob("round_*/*/records.jsonl"))}


@pytest.mark.slow
def test_two_local_processes_give_the_single_process_metrics(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = ["--config=configs/tiny.py", "--config.distill.epochs=2.0"]
  one = tmp_path / "one"  # One process: main's run in this process (what `main` calls).
  c = load_config("tiny.py")
  c.distill.epochs = 2.0
  main.run(c, str(one))
  two = tmp_path / "two"
  cmd = [sys.executable, "launch/local.py", "--num_processes=2", *args, f"--workdir={two}"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "2 processes, 2 devices in all" in out.stdout  # Really two processes (gloo).
  a, b = _metrics(one), _metrics(two)
  assert [m["round"] for m in b] == [0, 1]
  # Every generated answer is the same; distillation (data parallel over the 2 processes,
  # gradients all-reduced) ends with the same losses up to float summation order.
  assert _records(one) == _records(two) and len(_records(one)) == 5
  for x, y in zip(a, b):
    dx, dy = x.pop("distill", None), y.pop("distill", None)
    assert x == y
    if dx:
      assert dx["steps"] == dy["steps"] == 4
      for k in ("first_loss", "last_loss"):
        assert dx[k] == pytest.approx(dy[k], rel=1e-5)
  # Rerunning the same command resumes from the last checkpoint: nothing left to do.
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming from" in again.stdout and _metrics(two)[-1]["round"] == 1


def test_local_launcher_refuses_zero_processes():
  with pytest.raises(ValueError, match="num_processes=0 and devices_per_process=1 must both be >= 1"):
    launch.local_commands(num_processes=0, config="configs/tiny.py", workdir="/tmp/x")
