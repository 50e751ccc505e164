"""Entry point: `python -m single_multi.main --config=configs/quickstart.py [--workdir=DIR]`.

config.job: "evolve" (the single-multi loop, `evolve.py`) or "chat" (answer the config's prompts).
Overrides (`--config.rounds=3`) are checked against the config before anything loads: a misspelled
key fails at once. `--dry_run` builds nothing: it prints the sharding plan of the pool's params and
optimizer states from the architecture alone (`jax.eval_shape`) and the bytes per device.
Rerunning the same command resumes an interrupted run from its last finished stage.
"""

from __future__ import annotations

import pathlib

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (metrics, checkpoints); local "
                               "or a bucket path (gs://...).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the sharding plan and per-device bytes "
                             "without loading or computing anything.")
flags.mark_flags_as_required(["config"])


def run_chat(config, workdir: str | None = None) -> list[dict]:
  from single_multi import chat
  return chat.run(config.model, list(config.prompts), dtype=config.dtype,
                  batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                  sampler=chat.make_sampler(config.temperature, config.top_p), seed=config.seed,
                  output=pathlib.Path(workdir) / "generations.jsonl" if workdir else None)


def run(config, workdir: str | None = None, dry_run: bool = False):
  if config.get("job", "chat") == "chat":
    return run_chat(config, workdir)
  from single_multi import evolve, pools
  evolve.validate(config)
  if dry_run:
    return pools.dry_run(config)
  workdir = workdir or "/tmp/single_multi"
  pool = pools.build(config, workdir)
  return evolve.run(config, workdir, pool)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, _WORKDIR.value, _DRY_RUN.value)


if __name__ == "__main__":
  app.run(main)
