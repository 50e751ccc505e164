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

_MODEL = flags.DEFINE_string("model", "embedded:smollm2-135m-instruct", "Model source.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A user message (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one user message per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (sampling only).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (sampling only; 0 = off).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per decode call.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Optional JSONL file for {prompt, reply}.")


def make_sampler(temperature: float, top_p: float = 1.0, top_k: int = 0):
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature == 0:
    return decoding.Greedy()
  return decoding.Sampling(temperature=temperature, top_p=top_p, top_k=top_k)


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    path = pathlib.Path(_PROMPTS_FILE.value)
    if not path.exists():
      raise app.UsageError(f"--prompts_file {path} does not exist")
    prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise app.UsageError("give at least one --prompt or a --prompts_file")
  sampler = make_sampler(_TEMPERATURE.value, _TOP_P.value, _TOP_K.value)
  start = time.perf_counter()
  model = load(_MODEL.value, dtype=_DTYPE.value)
  print(f"loaded {_MODEL.value} ({model.config.num_params() / 1e6:.1f}M params, {_DTYPE.value}) "
        f"in {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}", file=sys.stderr)
  records = reply_all(model, prompts, batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value,
                      sampler=sampler, seed=_SEED.value)
  for r in records:
    print(f"\n>>> {r['prompt']}\n{r['reply']}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
  app.run(main)
