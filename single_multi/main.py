"""Entry point: `python -m single_multi.main --config=configs/quickstart.py [--workdir=DIR]`.

Until the evolution loop lands, the job loads the configured model and answers the configured
chat prompts (greedy or sampled), printing each reply and, with --workdir, writing them as JSONL.
"""

from __future__ import annotations

import pathlib

from absl import app, flags
from ml_collections import config_flags

from single_multi import chat

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (generations.jsonl).")
flags.mark_flags_as_required(["config"])


def run(config, workdir: str | None = None) -> list[dict]:
  return chat.run(config.model, list(config.prompts), dtype=config.dtype,
                  batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                  sampler=chat.make_sampler(config.temperature, config.top_p), seed=config.seed,
                  output=pathlib.Path(workdir) / "generations.jsonl" if workdir else None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
