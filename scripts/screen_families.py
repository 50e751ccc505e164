"""Screens candidate task families for a specialist pool, on dev rows only.

  python scripts/screen_families.py --families=number_words,reverse_words,key_value,acronym
                                    [--config=quickstart.py] [--workdir=/tmp/screen_families]

For the candidate families together as the loop's task (`synthetic:` families, or `bigbench:`
tasks with --prefix=bigbench), it scores the base and a specialist per family (the config's
recipe: `pools.specialist`, trained on rows outside the loop's dev and test rows) on the loop's
balanced dev selection (`dev_examples` rows split over the families), greedy. A good family has
the base near 0 and its specialist far above it, with the other specialists near 0 on it. This is
how configs/quickstart.py's families were chosen (its docstring gives the figures). Specialists
are cached under the workdir. The last line is one JSON object: {"rows": {family: n},
"base": {family: score}, "specialists": {family: {family: score}}, "seconds": {family: s}}.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax.numpy as jnp  # noqa: E402

from single_multi import configs, evaluate, pools  # noqa: E402
from single_multi.data import common, pipeline, tasks  # noqa: E402
from single_multi.models import loading  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--families", required=True)
  parser.add_argument("--prefix", default="synthetic", choices=("synthetic", "bigbench"))
  parser.add_argument("--config", default="quickstart.py")
  parser.add_argument("--workdir", default="/tmp/screen_families")
  args = parser.parse_args()
  families = [f.strip() for f in args.families.split(",") if f.strip()]
  config = configs.load(ROOT / "configs" / args.config)
  config.task = f"{args.prefix}:" + ",".join(families)
  loop = tasks.from_config(config.task, config)
  rows = common.balanced(loop.dev, config.dev_examples, config.seed)
  base = loading.load(config.pool[0], jnp.dtype(config.dtype))
  prompter = pipeline.Prompter(base.tokenizer, pipeline.PromptConfig(k_shot=0))

  def score(model) -> dict[str, float]:
    result = evaluate.evaluate(model, rows, prompter=prompter, metric=loop.spec.metric,
                               batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens, progress=False)
    by_subject = next(iter(result.summary["models"].values()))["by_subject"]
    return {k: round(v, 3) for k, v in by_subject.items()}

  out = {"rows": common.composition(rows), "base": score(base), "specialists": {},
         "seconds": {}}
  print("rows", out["rows"], "\nbase", out["base"], flush=True)
  for family in families:
    t0 = time.time()
    name = f"{args.prefix}:{family}"
    params = pools.specialist(base, name, pathlib.Path(args.workdir) / pools.specialist_key(
        config, name), config)
    out["specialists"][family] = score(dataclasses.replace(base, params=params))
    out["seconds"][family] = round(time.time() - t0)
    print("specialist", family, out["specialists"][family], flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
