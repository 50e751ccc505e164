"""SmolLM2-135M-Instruct alone on the paper's tasks: the baseline table of docs/results.md.

  python scripts/moco_baselines.py [--moco_data_dir=../shared/moco_data] [--rows=200]
                                   [--max_new_tokens=512] [--tasks=agieval,...]

For each of the 14 tasks that need no reward model (human_interest is scored by one): a seeded
sample of `--rows` valid test rows (all when fewer; the sample is a hash of (seed, row id), chosen
without looking at any score), answered with the reference's prompts (`PromptConfig(style="moco")`,
zero-shot, greedy decoding, `--max_new_tokens`) and scored by the reference's rules (metric
"moco"); multiple-choice tasks are also scored by option log-likelihood (the question alone as the
prompt, each option as the reply). Each score has its 95% bootstrap CI; beside it: chance (MC:
the mean share of correct options), the majority class (MC: the most common gold letter's rate
among the rows; exact-match tasks: the most common gold answer's rate), the position baseline
(always the dev split's most common gold letter) and the wall time. Writes its section of
docs/results.md, the per-row records under --workdir, the per-task figures to --summary
(docs/moco_baselines.json, kept in the repository), and prints a JSON summary on its last line.
Resumable, also on another machine: a rerun with the same --rows, --seed and --max_new_tokens
keeps the tasks already in --summary (written after each task) and runs the others.
"""

import argparse
import collections
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = ("agieval", "arc_challenge", "mmlu_redux", "bbh", "gsm8k", "math", "gpqa_diamond",
         "tablemwp_free_text", "tablemwp_multiple_choice", "theoremqa", "wikidyk", "popqa",
         "blend", "truthfulqa", "sciriff")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--moco_data_dir", default=os.environ.get(
      "SINGLE_MULTI_MOCO_DATA", str(ROOT.parent / "shared" / "moco_data")))
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--rows", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_new_tokens", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=32,
                      help="the most rows per batch; fewer where prompts are long (--memory_gb)")
  parser.add_argument("--memory_gb", type=float, default=8.0,
                      help="what one batch may take: a task whose longest prompt + "
                           "--max_new_tokens is L tokens runs batches of at most memory_gb / "
                           "(160 B x L^2) rows (a power of two). A conservative rule: 160 B per "
                           "(row, token^2) is what agieval's out-of-memory at 32 rows implied "
                           "before long prefills attended in query blocks")
  parser.add_argument("--workdir", default="/tmp/single_multi_moco_baselines")
  parser.add_argument("--output", default=str(ROOT / "docs" / "results.md"))
  parser.add_argument("--summary", default=str(ROOT / "docs" / "moco_baselines.json"))
  parser.add_argument("--page_only", action="store_true",
                      help="rewrite the docs section from --summary; run nothing")
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  import single_multi as sm
  from single_multi import evaluate
  from single_multi.data import common, metrics, pipeline, tasks
  from doc_sections import write_section

  model = sm.load("embedded:smollm2-135m-instruct")
  prompter = pipeline.Prompter(model.tokenizer, pipeline.PromptConfig(style="moco"))
  # Resumable: tasks already in --summary (same rows, seed and token budget) are kept.
  summary_path = pathlib.Path(args.summary)
  settings = {"rows": args.rows, "seed": args.seed, "max_new_tokens": args.max_new_tokens}
  summary = {}
  if summary_path.exists():
    saved = json.loads(summary_path.read_text())
    if saved.get("settings") == settings:
      summary = saved["tasks"]
  for name in [] if args.page_only else args.tasks.split(","):
    if name in summary:
      print(f"{name}: kept from {summary_path}", flush=True)
      continue
    task = tasks.load_task(f"moco:{name}", moco_dir=args.moco_data_dir)
    valid = [e for e in task.test if not e.problem]
    sample = sorted(valid, key=lambda e: common.split_fraction(e.id, args.seed))[:args.rows]
    dev = task.dev
    longest = max(len(prompter.ids(e)) for e in sample) + args.max_new_tokens
    batch_size = args.batch_size
    while batch_size > 1 and batch_size * 160 * longest ** 2 > args.memory_gb * 2**30:
      batch_size //= 2
    out_dir = pathlib.Path(args.workdir) / name
    t0 = time.perf_counter()
    gen = evaluate.evaluate(model, sample, prompter=prompter, task_name=task.name, metric="moco",
                            batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                            reference=dev, output_dir=out_dir / "generate", seed=args.seed)
    entry = {"type": _kind(name), "rows": len(sample), "batch_size": batch_size,
             "generate": gen.summary["models"][model.source]["score"],
             "generate_seconds": time.perf_counter() - t0,
             "baselines": {k: v for k, v in gen.summary["baselines"].items() if k != "by_subject"},
             "answers": gen.summary["models"][model.source].get("answer_positions", {})}
    if sample and sample[0].is_mc:
      t1 = time.perf_counter()
      ll = evaluate.evaluate(model, sample, prompter=prompter, task_name=task.name,
                             method="loglik", batch_size=batch_size, reference=dev,
                             output_dir=out_dir / "loglik", seed=args.seed)
      entry["loglik"] = ll.summary["models"][model.source]["accuracy"]
      entry["loglik_norm"] = ll.summary["models"][model.source]["accuracy_norm"]
      entry["loglik_seconds"] = time.perf_counter() - t1
    else:
      gold = collections.Counter(metrics.normalize_answer(e.targets[0]) for e in sample)
      top, count = gold.most_common(1)[0]
      entry["majority_answer"] = {"answer": top, "rate": count / len(sample)}
    summary[name] = entry
    print(_row(name, entry), flush=True)
    # The page and the summary are rewritten after every task: a killed run loses one task.
    rows_out = [_row(n, summary[n]) for n in TASKS if n in summary]
    total = sum(e["generate_seconds"] + e.get("loglik_seconds", 0.0) for e in summary.values())
    missing = [n for n in TASKS if n not in summary]
    write_section(pathlib.Path(args.output), "moco_baselines",
                  _page(rows_out, args, total, missing))
    summary_path.write_text(json.dumps({"settings": settings, "tasks": summary}, indent=1))
  total = sum(e["generate_seconds"] + e.get("loglik_seconds", 0.0) for e in summary.values())
  if args.page_only:
    rows_out = [_row(n, summary[n]) for n in TASKS if n in summary]
    write_section(pathlib.Path(args.output), "moco_baselines",
                  _page(rows_out, args, total, [n for n in TASKS if n not in summary]))
  print(json.dumps({"tasks": len(summary), "total_seconds": round(total, 1),
                    **{k: round(v["generate"]["mean"], 3) for k, v in summary.items()}}))


def _kind(name):
  from single_multi.data import moco
  return moco.FILES[name][0]


def _ci(s):
  return f"{s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def _row(name, e):
  b = e["baselines"]
  if "mc_rows" in b:
    chance = f"{b['chance']:.3f}"
    majority = f"{b['majority_class']['rate']:.3f} ({b['majority_class']['letter']})"
    position = f"{b['position']['accuracy']:.3f} ({b['position']['letter']})"
  else:
    chance, majority, position = "~0", (f"{e['majority_answer']['rate']:.3f} "
                                        f"({e['majority_answer']['answer'][:16]!r})"), "-"
  ll = f"{_ci(e['loglik'])} / {_ci(e['loglik_norm'])}" if "loglik" in e else "-"
  seconds = e["generate_seconds"] + e.get("loglik_seconds", 0.0)
  top = max(e["answers"].items(), key=lambda kv: kv[1]) if e.get("answers") else None
  answered = f"{top[0]} {top[1]:.0%}" if top else "-"
  return (f"| {name} | {e['type']} | {e['rows']} | {_ci(e['generate'])} | {answered} | {ll} | "
          f"{chance} | {majority} | {position} | {seconds:.0f} |")


def _page(rows, args, total, missing=()):
  return f"""## SmolLM2-135M-Instruct on the paper's tasks (made by `python scripts/moco_baselines.py`)

The paper's task files (the MoCo toolkit's `model_collaboration/data/`, commit ecea545, published
test splits) with the reference's prompts and scoring (`moco:<task>`, data/moco.py). Per task a
seeded sample of {args.rows} valid test rows (all where fewer; seed {args.seed}, a hash of the row
id, fixed before any score was seen). Generation: zero-shot, greedy, at most
{args.max_new_tokens} new tokens, the reference's reply parse (multiple choice), `\\box{{}}`
extraction then SQuAD exact match (exact_match) or token F1 (f1_match; popqa over its aliases).
Log-likelihood (multiple choice only): the question alone as the prompt, each option's text as
the reply; raw / length-normalised accuracy. 95% CIs: percentile bootstrap over the rows (1000
resamples). Baselines on the same rows: chance (MC: the mean share of correct options; exact
match: about 0), the majority class (MC: the most common gold letter's rate; otherwise the most
common gold answer's rate), the position baseline (always the dev split's most common gold
letter). Most given letter (multiple choice): the option letter the generated answers name most
often, with its share of the rows; far above the gold letters' rates it is a position bias, not
a reading of the questions. human_interest is left out: it is scored by a reward model. CPU (2 cores), fp32;
batches of {args.batch_size} rows, halved for tasks with long prompts so that one batch's
attention fits in {args.memory_gb:g} GB (the batch size changes greedy answers only through
float rounding).
Total time {total / 60:.1f} min
(the sum of the per-task times).

| task | type | rows | generate [95% CI] | most given letter | loglik acc / acc_norm [95% CI] | chance | majority class | position baseline | seconds |
|---|---|---:|---|---|---|---|---|---|---:|
""" + "\n".join(rows) + "\n" + (f"\nNot run yet: {', '.join(missing)} (the script resumes "
                                 "where it stopped).\n" if missing else "")


if __name__ == "__main__":
  main()
