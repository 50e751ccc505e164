"""Entry point: `python -m single_multi.main --config=configs/quickstart.py [--workdir=DIR]`.

config.job: "evolve" (the single-multi loop, `evolve.py`), "co_llm" (`co_llm_run.py`) or "chat"
(answer the config's prompts). Every field is described in docs/config.md.
Overrides (`--config.rounds=3`) are checked against the config before anything loads: a misspelled
key fails at once. `--dry_run` builds nothing: it prints the sharding plan of the pool's params and
optimizer states from the architecture alone (`jax.eval_shape`) and the bytes per device; with
`--config.compile_topology=v5p:2x2x2` it compiles every program of a round for that TPU topology
instead (compile_plan.py: per-device bytes, FLOPs, a fit verdict; needs the `tpu` extra).
Rerunning the same command resumes an interrupted run from its last finished stage.
Multi-process: `--distributed` (TPU pods, SLURM: discovered from the environment) or
`--coordinator_address/--num_processes/--process_id` (see launch/).
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import pathlib
import sys
from typing import Iterator

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (metrics, checkpoints); local "
                               "or a bucket path (gs://...).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the sharding plan and per-device bytes "
                             "without loading or computing anything.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of an expected error (a "
                           "bad config, missing data, an offline download) instead of one line.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: the cluster is discovered "
    "from the environment (TPU pod slices, SLURM, ...). Implied by --coordinator_address.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 in a "
                                   "hand-launched multi-process run (with --num_processes and "
                                   "--process_id; gloo collectives on CPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config"])


JOBS = ("evolve", "chat", "co_llm")
DEFAULT_WORKDIRS = {"evolve": "/tmp/single_multi", "co_llm": "/tmp/co_llm"}
# Libraries whose INFO records (Orbax's save steps, TFDS's dataset generation and reads) stay off
# the console; a loop run keeps them in its workdir's log file (`log_file`) with everything else.
QUIET_LIBRARIES = ("orbax", "tensorflow_datasets")
LOG_FILE = "log.txt"


def console_filter(record: std_logging.LogRecord) -> bool:
  """Whether the console shows an absl log record: all of ours but TFDS's prints we pass on
  (data/common.py's `prepare`); a quiet library's warnings and errors only, less TFDS's "Using
  custom data configuration" (every task here is one)."""
  common = sys.modules.get("single_multi.data.common")  # Not imported: it logged nothing yet.
  if (common is not None and record.levelno < std_logging.WARNING
      and record.getMessage().startswith(common.TFDS_PRINT)):
    return False
  if not any(f"{name}/" in record.pathname.replace("\\", "/") for name in QUIET_LIBRARIES):
    return True
  return (record.levelno >= std_logging.WARNING
          and not record.getMessage().startswith("Using custom data configuration"))


@contextlib.contextmanager
def log_file(workdir: str, process: int = 0) -> Iterator[pathlib.Path | None]:
  """While open, every absl log record from INFO up also goes to `<workdir>/log.txt` (process 0;
  process i writes `log.<i>.txt`), appended, so a resumed run adds to it. Nothing for a bucket
  workdir (gs://...): the console only."""
  if "://" in str(workdir):
    yield None
    return
  name = LOG_FILE if process == 0 else LOG_FILE.replace(".txt", f".{process}.txt")
  path = pathlib.Path(workdir) / name
  path.parent.mkdir(parents=True, exist_ok=True)  # Process i > 0 may come before process 0 made it.
  handler = std_logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(std_logging.INFO)
  handler.setFormatter(logging.PythonFormatter())
  logger = logging.get_absl_logger()
  logger.addHandler(handler)
  try:
    yield path
  finally:
    logger.removeHandler(handler)
    handler.close()


def run_chat(config, workdir: str | None = None) -> list[dict]:
  from single_multi import chat, decoding
  return chat.run(config.model, list(config.prompts), dtype=config.dtype,
                  batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                  sampler=decoding.make_sampler(config.temperature, config.top_p),
                  seed=config.seed,
                  output=pathlib.Path(workdir) / "generations.jsonl" if workdir else None)


def run(config, workdir: str | None = None, dry_run: bool = False):
  job = config.get("job", "chat")
  if job not in JOBS:
    from single_multi.configs import ConfigError
    raise ConfigError(f"unknown job {job!r}; choose one of {JOBS}")
  if not dry_run:
    from single_multi import assets
    assets.enable_compilation_cache(config.get("jax_cache_dir", ""))
  if job == "chat":
    return run_chat(config, workdir)
  if job == "co_llm":
    from single_multi import co_llm_run
    return co_llm_run.run(config, workdir or DEFAULT_WORKDIRS["co_llm"])
  from single_multi import evolve, pools, workdir as workdir_lib
  evolve.validate(config)
  if dry_run:
    if config.get("compile_topology"):
      from single_multi import compile_plan
      return compile_plan.plan(config, workdir or DEFAULT_WORKDIRS["evolve"])
    return pools.dry_run(config)
  workdir = workdir or DEFAULT_WORKDIRS["evolve"]
  # Before the pool is built (specialists are fine-tuned into the workdir): this run owns it, and
  # a resumed run has the workdir's config.
  with workdir_lib.workdir_lock(workdir):
    workdir_lib.check_workdir_config(config, workdir)
    import jax
    with log_file(workdir, jax.process_index()):
      pool = pools.build(config, workdir)
      return evolve.run(config, workdir, pool)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(console_filter)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    from single_multi import sharding
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    run(_CONFIG.value, _WORKDIR.value, _DRY_RUN.value)
  except expected_errors() as e:
    if _DEBUG.value:
      raise
    print(f"error: {type(e).__name__}: {e}\n(--debug shows the traceback)", file=sys.stderr)
    sys.exit(2)


def expected_errors() -> tuple[type[BaseException], ...]:
  """Errors a user can cause and fix (bad config or input, missing data or assets): the CLI
  reports them in one line and exits 2. Anything else is a bug: its traceback is shown."""
  from single_multi import assets, compile_plan, configs, distill, pool, workdir
  from single_multi.collab import core
  from single_multi.data import common
  from single_multi.models import config, gguf_file, loading
  return (configs.ConfigError, workdir.CheckpointError, workdir.WorkdirLockedError,
          common.DataError, core.StrategyError, pool.PoolMismatchError, loading.LoadError,
          config.UnsupportedModelError, gguf_file.GGUFError, assets.AssetError,
          compile_plan.TopologyError, distill.Diverged, FileNotFoundError)


if __name__ == "__main__":
  app.run(main)
