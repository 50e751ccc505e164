"""Launching a config on a TPU VM / pod slice, on GPU hosts, or as N local CPU processes.

  python launch/tpu.py --name=sm --zone=us-east5-a --accelerator=v5p-32 \
      --config=configs/mmlu.py --workdir=gs://bucket/run [--config.rounds=3 ...] [--dry_run]
  python launch/gpu.py --hosts=gpu0,gpu1 --config=configs/mmlu.py --workdir=gs://bucket/run
  python launch/local.py --num_processes=2 --config=configs/tiny.py --workdir=/tmp/run

Every launcher builds its commands first (`*_commands`, argv lists) and `--dry_run` prints them
instead of running them. Arguments it does not know (`--config.x=y`) go to `single_multi.main`.
On every host the same `python -m single_multi.main` runs; `jax.distributed.initialize` joins the
processes: discovered from the environment on TPU (`--distributed`), or given explicitly
(`--coordinator_address=<host 0>:<port> --num_processes=H --process_id=i`).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

MAIN = ("-m", "single_multi.main")
TPU_PORT = 8476  # jax.distributed's default coordinator port.


def main_args(config: str, workdir: str, extra: Sequence[str]) -> list[str]:
  return [f"--config={config}", f"--workdir={workdir}", *extra]


def _remote(python: str, repo: str, args: Sequence[str]) -> str:
  return f"cd {shlex.quote(repo)} && " + shlex.join([python, *MAIN, *args])


# -------------------------------------------------------------------------------------------------
# TPU VM / pod slice (gcloud).


def tpu_commands(*, name: str, zone: str, accelerator: str, config: str, workdir: str,
                 extra: Sequence[str] = (), project: str | None = None,
                 version: str = "v2-alpha-tpuv5", spot: bool = False, num_hosts: int | None = None,
                 repo: str = "single_multi", create: bool = True, delete: bool = False,
                 source: str = ".") -> list[list[str]]:
  """create -> copy the repo to every worker -> install -> run on every worker [-> delete].

  num_hosts None: each host calls jax.distributed.initialize() and the TPU runtime supplies the
  coordinator (worker 0), process count and ids. num_hosts H: the coordinator address is worker
  0's internal IP (read with `describe`) and worker i runs with --process_id=i.
  """
  if not workdir.startswith("gs://"):
    raise ValueError(f"--workdir={workdir}: on a TPU VM the workdir must be a bucket (gs://...) "
                     "that every host and you can read; local disks vanish with the VM")
  common = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  cmds = []
  if create:
    cmds.append([*tpu, "create", name, *common, f"--accelerator-type={accelerator}",
                 f"--version={version}", *(["--spot"] if spot else [])])
  archive = f"/tmp/{repo}.tar.gz"
  cmds.append(["tar", "czf", archive, "--exclude=.git", "--exclude=.venv", "-C", source, "."])
  cmds.append([*tpu, "scp", archive, f"{name}:{repo}.tar.gz", *common, "--worker=all"])
  install = (f"mkdir -p {repo} && tar xzf {repo}.tar.gz -C {repo} && cd {repo} && "
             "python3 -m pip install -q -e . 'jax[tpu]'")
  cmds.append([*tpu, "ssh", name, *common, "--worker=all", f"--command={install}"])
  args = main_args(config, workdir, extra)
  if num_hosts is None:
    cmds.append([*tpu, "ssh", name, *common, "--worker=all",
                 f"--command={_remote('python3', repo, [*args, '--distributed'])}"])
  else:
    # One local script: read worker 0's internal IP, start every worker with it, wait for all.
    lines = ["set -e", "COORD=$(" + shlex.join(
        [*tpu, "describe", name, *common, "--format=value(networkEndpoints[0].ipAddress)"]) + ")"]
    for i in range(num_hosts):
      dist = [f"--coordinator_address=__COORD__:{TPU_PORT}", f"--num_processes={num_hosts}",
              f"--process_id={i}"]
      ssh = shlex.join([*tpu, "ssh", name, *common, f"--worker={i}",
                        f"--command={_remote('python3', repo, [*args, *dist])}"])
      lines.append(ssh.replace("__COORD__", "'\"$COORD\"'") + " &")
    lines.append("wait")
    cmds.append(["bash", "-c", "\n".join(lines)])
  if delete:
    cmds.append([*tpu, "delete", name, *common, "--quiet"])
  return cmds


# -------------------------------------------------------------------------------------------------
# GPU hosts (ssh), one process per host seeing all its GPUs.


def gpu_commands(*, hosts: Sequence[str], config: str, workdir: str, extra: Sequence[str] = (),
                 port: int = 12355, repo: str = "single_multi",
                 python: str = "python3") -> list[list[str]]:
  """One host ("localhost"): run main directly. H hosts: `ssh host_i` runs main with the
  coordinator on host 0 and --process_id=i (start them together: the launcher runs them in
  parallel)."""
  env = ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"]
  args = main_args(config, workdir, extra)
  if list(hosts) in ([], ["localhost"]):
    return [[*env, python, *MAIN, *args]]
  dist = lambda i: [f"--coordinator_address={hosts[0]}:{port}", f"--num_processes={len(hosts)}",
                    f"--process_id={i}"]
  return [["ssh", h, shlex.join(env) + " bash -c " + shlex.quote(
      _remote(python, repo, [*args, *dist(i)]))] for i, h in enumerate(hosts)]


# -------------------------------------------------------------------------------------------------
# N local CPU processes (gloo collectives).


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def local_commands(*, num_processes: int, config: str, workdir: str, extra: Sequence[str] = (),
                   port: int | None = None, devices_per_process: int = 1
                   ) -> list[tuple[dict[str, str], list[str]]]:
  """(environment additions, argv) per process."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes={num_processes} and devices_per_process="
                     f"{devices_per_process} must both be >= 1")
  port = port or free_port()
  env = {"JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
  return [(env, [sys.executable, *MAIN, *main_args(config, workdir, extra),
                 f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                 f"--process_id={i}"]) for i in range(num_processes)]


def run_local(commands, timeout: float | None = None) -> None:
  """Starts every process; process 0 prints to this terminal, the others to log files; a failure
  stops the others and raises with their log tails."""
  procs, logs = [], []
  for i, (env, argv) in enumerate(commands):
    log = None if i == 0 else tempfile.NamedTemporaryFile("w+", prefix=f"process_{i}_",
                                                          suffix=".log", delete=False)
    logs.append(log)
    procs.append(subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                  stderr=subprocess.STDOUT if log else None, text=True))
  deadline = None if timeout is None else time.monotonic() + timeout
  try:  # Watch all of them: one that fails would leave the others waiting in a collective.
    while (any(p.poll() is None for p in procs) and not any(p.poll() for p in procs)
           and (deadline is None or time.monotonic() < deadline)):
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  codes = [p.wait() for p in procs]
  bad = [(i, c) for i, c in enumerate(codes) if c]
  if bad:
    tails = {i: pathlib.Path(logs[i].name).read_text()[-2000:] if logs[i] else "(above)"
             for i, _ in bad}
    raise RuntimeError(f"process(es) failed (index, exit code): {bad}; output tails: {tails}")
  for log in logs[1:]:
    os.unlink(log.name)


# -------------------------------------------------------------------------------------------------
# Command lines.


def _parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description,
                              epilog="Unknown arguments (--config.rounds=3 ...) go to main.")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--dry_run", action="store_true", help="print every command, run nothing")
  return p


def _print(cmds) -> None:
  for c in cmds:
    if isinstance(c, tuple):
      env, argv = c
      c = [*(f"{k}={v}" for k, v in env.items()), *argv]
    print(shlex.join(c))


def cli(kind: str, argv: Sequence[str] | None = None) -> None:
  if kind == "tpu":
    p = _parser("Run a config on a TPU VM or pod slice (gcloud).")
    p.add_argument("--name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator", required=True, help="e.g. v5p-32, v5litepod-8, v4-8")
    p.add_argument("--project")
    p.add_argument("--version", default="v2-alpha-tpuv5", help="TPU VM runtime image")
    p.add_argument("--spot", action="store_true")
    p.add_argument("--num_hosts", type=int, help="explicit coordinator mode (else discovered)")
    p.add_argument("--no_create", action="store_true", help="the TPU VM exists already")
    p.add_argument("--delete", action="store_true", help="delete the TPU VM at the end")
    a, extra = p.parse_known_args(argv)
    cmds = tpu_commands(name=a.name, zone=a.zone, accelerator=a.accelerator, config=a.config,
                        workdir=a.workdir, extra=extra, project=a.project, version=a.version,
                        spot=a.spot, num_hosts=a.num_hosts, create=not a.no_create,
                        delete=a.delete)
  elif kind == "gpu":
    p = _parser("Run a config on one or more GPU hosts (ssh; one process per host).")
    p.add_argument("--hosts", default="localhost", help="comma-separated; host 0 coordinates")
    p.add_argument("--port", type=int, default=12355)
    a, extra = p.parse_known_args(argv)
    cmds = gpu_commands(hosts=a.hosts.split(","), config=a.config, workdir=a.workdir,
                        extra=extra, port=a.port)
  elif kind == "local":
    p = _parser("Run a config as N CPU processes on this machine (jax.distributed, gloo).")
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=1)
    a, extra = p.parse_known_args(argv)
    cmds = local_commands(num_processes=a.num_processes, config=a.config, workdir=a.workdir,
                          extra=extra, devices_per_process=a.devices_per_process)
  else:
    raise ValueError(f"unknown launcher {kind!r}")
  if a.dry_run:
    _print(cmds)
    return
  if kind == "local":
    run_local(cmds)
  elif kind == "gpu" and len(cmds) > 1:  # Hosts start together and wait for each other.
    run_local([({}, c) for c in cmds])
  else:
    for c in cmds:
      print("+", shlex.join(c), flush=True)
      subprocess.run(c, check=True)
