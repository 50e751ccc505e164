"""Demo CLI: chat replies from any model source, in batches, with a progress bar.

  python -m single_multi.chat --model=embedded:smollm2-135m-instruct \
      --prompt="What is the capital of France?" --prompt="Name a prime number."
  python -m single_multi.chat --model=/path/to/hf_dir --prompts_file=questions.txt \
      --temperature=0.7 --top_p=0.9 --output=replies.jsonl

Prompts of a batch are left-padded to a length bucket, so nearby lengths share one compiled
program; the whole decode of a batch is one jitted call.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Sequence

import jax
from absl import app, flags
from tqdm import tqdm

from single_multi import decoding
from single_multi.models.loading import Model, load

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when this module is the program (main.py imports run())."""
  flags.DEFINE_string("model", "embedded:smollm2-135m-instruct", "Model source.")
  flags.DEFINE_multi_string("prompt", [], "A user message (repeatable).")
  flags.DEFINE_string("prompts_file", None, "A file with one user message per line.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus mass (sampling only).")
  flags.DEFINE_integer("top_k", 0, "Top-k (sampling only; 0 = off).")
  flags.DEFINE_integer("batch_size", 8, "Prompts per decode call.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("output", None, "Optional JSONL file for {prompt, reply}.")


def reply_all(model: Model, prompts: Sequence[str], *, batch_size: int, max_new_tokens: int,
              sampler, seed: int = 0) -> list[dict]:
  """Replies to single-turn chat prompts in batches (progress bar); records {prompt, reply}."""
  records = []
  for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch",
                    file=sys.stderr):
    batch = list(prompts[start:start + batch_size])
    replies = decoding.generate(model, [[{"role": "user", "content": p}] for p in batch],
                                max_new_tokens=max_new_tokens, sampler=sampler, seed=seed + start)
    records += [{"prompt": p, "reply": r} for p, r in zip(batch, replies)]
  return records


def run(source: str, prompts: Sequence[str], *, dtype: str = "float32", batch_size: int = 8,
        max_new_tokens: int = 128, sampler=decoding.Greedy(), seed: int = 0,
        output: str | pathlib.Path | None = None) -> list[dict]:
  """Loads `source`, replies to `prompts`, prints each reply, and writes JSONL to `output`."""
  start = time.perf_counter()
  model = load(source, dtype=dtype)
  print(f"loaded {source} ({model.config.num_params() / 1e6:.1f}M params, {dtype}) "
        f"in {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}", file=sys.stderr)
  records = reply_all(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      sampler=sampler, seed=seed)
  for r in records:
    print(f"\n>>> {r['prompt']}\n{r['reply']}")
  if output:
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_file:
    path = pathlib.Path(FLAGS.prompts_file)
    if not path.exists():
      raise app.UsageError(f"--prompts_file {path} does not exist")
    prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise app.UsageError("give at least one --prompt or a --prompts_file")
  run(FLAGS.model, prompts, dtype=FLAGS.dtype, batch_size=FLAGS.batch_size,
      max_new_tokens=FLAGS.max_new_tokens,
      sampler=decoding.make_sampler(FLAGS.temperature, FLAGS.top_p, FLAGS.top_k), seed=FLAGS.seed,
      output=FLAGS.output)


if __name__ == "__main__":
  define_flags()
  app.run(main)
