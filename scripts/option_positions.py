"""Where the gold option sits in every multiple-choice BIG-bench JSON task, as stored and as shown.

  python scripts/option_positions.py [--output=docs/option_positions.md] [--seed=0]

Reads every `task.json` of the `bigbench==1.0.0` sdist (fetched once into the cache) straight from
the archive, builds the rows as the builder does (`bigbench.spec_examples`; subtasks separately),
and runs `common.position_check` on them in the file's order and in the loader's seeded order
(`common.shuffle_options`). Writes a markdown table of the tasks whose stored order is skewed
(a gold position above twice its uniform share) and prints a JSON summary on its last line.
"""

import argparse
import json
import pathlib
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=str(ROOT / "docs" / "option_positions.md"))
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  from single_multi import assets
  from single_multi.data import bigbench, common
  from single_multi.data.metrics import LETTERS

  start = time.perf_counter()
  prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/"
  rows = []
  with tarfile.open(assets.fetch_bigbench_sdist(), "r:gz") as tar:
    for member in tar:
      if not (member.isfile() and member.name.startswith(prefix)
              and member.name.endswith("/task.json")):
        continue
      name = member.name[len(prefix):-len("/task.json")]
      try:
        spec = json.loads(tar.extractfile(member).read().decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        continue  # The builder reports such files as bad rows; nothing to count here.
      stored = [common.validate(e) for e in bigbench.spec_examples(spec, name)]
      before = common.position_check(stored)
      if before.rows == 0:
        continue
      after = common.position_check(common.shuffle_options(e, args.seed) for e in stored)
      rows.append((name, before, after))
  rows.sort(key=lambda r: r[0])
  skewed = [r for r in rows if r[1].skewed]
  lines = [
      "# Gold-option positions in BIG-bench's multiple-choice JSON tasks",
      "",
      f"Made by `scripts/option_positions.py` (seed {args.seed}). {len(rows)} (sub)tasks have "
      f"multiple-choice rows; in **{len(skewed)}** of them the file's order puts the gold option "
      "at one position more than twice as often as a uniform placement would (judged where a "
      "task has at least 20 rows). The loader shows every BIG-bench task's options in a random "
      "order fixed by (seed, example id); the last columns are the positions as shown.",
      "",
      "| task | MC rows | options | top gold position as stored | as shown (seed "
      f"{args.seed}) |",
      "|---|---:|---:|---|---|",
  ]
  for name, before, after in skewed:
    top = max(range(len(before.counts)), key=before.counts.__getitem__)
    top_after = max(range(len(after.counts)), key=after.counts.__getitem__)
    lines.append(f"| {name} | {before.rows} | {len(before.counts)} | "
                 f"{LETTERS[top]} {before.shares[top]:.0%} | "
                 f"{LETTERS[top_after]} {after.shares[top_after]:.0%} |")
  pathlib.Path(args.output).write_text("\n".join(lines) + "\n")
  summary = {"tasks_with_mc_rows": len(rows), "skewed_as_stored": len(skewed),
             "skewed_as_shown": sum(bool(a.skewed) for _, _, a in rows),
             "seconds": round(time.perf_counter() - start, 1)}
  for name in ("arithmetic/3_digit_addition", "arithmetic/2_digit_multiplication",
               "date_understanding"):
    for n, before, after in rows:
      if n == name:
        summary[name] = {"stored_max_share": round(max(before.shares), 3),
                         "shown_max_share": round(max(after.shares), 3), "rows": before.rows}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
