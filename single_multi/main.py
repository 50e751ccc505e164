"""Entry point: `python -m single_multi.main --config=configs/quickstart.py [--workdir=DIR]`.

Until the evolution loop lands, the job loads the configured model and answers the configured
chat prompts (greedy or sampled), printing each reply and, with --workdir, writing them as JSONL.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import single_multi as sm
from single_multi import chat

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (generations.jsonl).")
flags.mark_flags_as_required(["config"])


def run(config, workdir: str | None = None) -> list[dict]:
  sampler = chat.make_sampler(config.temperature, config.top_p)
  start = time.perf_counter()
  model = sm.load(config.model, dtype=config.dtype)
  print(f"loaded {config.model}: {model.config.num_params() / 1e6:.1f}M params "
        f"({config.dtype}) in {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}")
  records = chat.reply_all(model, list(config.prompts), batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens, sampler=sampler,
                               seed=config.seed)
  for r in records:
    print(f"\n>>> {r['prompt']}\n{r['reply']}")
  if workdir:
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "generations.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    logging.info("wrote %s", out / "generations.jsonl")
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
