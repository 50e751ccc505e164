"""The loop for several strategies x the distillation methods each supports, and its section of
docs/results.md.

  python scripts/results.py [--quick] [--strategies=trained_router,logit_fusion,...]
                            [--methods=supervised_kd,...] [--config=quickstart.py] [--rounds=N]
                            [--workdir=/tmp/single_multi_results] [--page_only]
  python scripts/results.py --default_run=W [--default_time_log=LOG]

--default_run: the section on one finished run of the embedded default (the README's first
command, workdir W; LOG its `/usr/bin/time -v` output), with the targets it meets.

Each (strategy, method) runs `evolve.run` in its own workdir (resumable: a rerun continues where
a killed one stopped; the wall time of every sitting is added up in `<workdir>/wall.json`); the
pool (the config's specialists) is built once and shared, and so are the evaluations that are
the same in every run (`<workdir>/eval_cache`, `eval_memo.py`: round 0's singles and the base,
read by each later run instead of decoded). A combination the loop refuses
(`evolve.validate`, e.g. logit_kd with a router) is listed with the reason, not run.

The page reports, per run, from its summary.json: the single-model mean and the collaboration at
round 0 and at the last round, the paired changes on the same test rows with paired bootstrap 95%
CIs, the round-0 collaboration minus the round-0 best single (paired), collapses, the wall time,
and one sentence on whether the paper's two directions appear (singles better after the rounds;
the last collaboration better than round 0's), judged by the paired CI: "up" only when its lower
end is above 0. Per task family: each run's single mean and collaboration at round 0 and at the
end, next to the family's chance level and majority-class rate.

--quick: supervised_kd only, at most 24 test and 20 dev (and fit) rows per family, 1 round
(measured: 23.8 minutes for the four default strategies on the embedded default, on 2 cores,
the compilation cache warm from earlier runs of the default: multiagent_refine 10.2,
trained_router 7.8 with the specialists, logit_fusion 3.1, dare_ties 2.7; 31.9 before the
singles, the routing and the text-level rounds prefilled the prompts' shared head and the
router head got its L2 penalty, 38.9 on the earlier BIG-bench default);
the full run's time is printed and written (measured: 111.6 minutes for the 10 runs the loop
accepts, 300 test rows each, on 2 cores, one process peaking at 11.4 GB RSS; multiagent_refine
40.7 of them).
Where each run's time went (`timings.jsonl`: singles, collaboration, fit, base, the rest) is
tabled on the page.
"""

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
STRATEGIES = "trained_router,logit_fusion,multiagent_refine,dare_ties"
QUICK_ROWS = (24 * 3, 20 * 3)  # --quick: at most these test and dev (and fit) rows.


def _ci(d) -> str:
  return f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def direction(d) -> str:
  """'up' / 'down' when the paired 95% CI excludes 0 on that side, else 'not resolved'."""
  lo, hi = d["ci95"]
  return "up" if lo > 0 else "down" if hi < 0 else "not resolved"


def sentence(summary) -> str:
  p = summary["paired"]
  singles, collab = direction(p["single_mean"]), direction(p["collab"])
  both = singles == "up" and collab == "up"
  return (f"singles {singles} ({_ci(p['single_mean'])}), collaboration {collab} "
          f"({_ci(p['collab'])}): " + ("both of the paper's directions appear." if both else
                                       "the paper's directions do not both appear here."))


def run_one(config, workdir: pathlib.Path, shared: pathlib.Path):
  """evolve.run in `workdir` (resuming), the pool's specialists shared; returns the summary."""
  from single_multi import evolve, pools
  workdir.mkdir(parents=True, exist_ok=True)
  link = workdir / "specialists"
  if config.specialists and not link.exists():
    shared.mkdir(parents=True, exist_ok=True)
    link.symlink_to(shared)
  wall_path = workdir / "wall.json"
  wall = json.loads(wall_path.read_text()) if wall_path.exists() else {"seconds": 0.0}
  if not (workdir / "summary.json").exists():
    start = time.perf_counter()
    try:
      evolve.run(config, workdir, pools.build(config, workdir))
    finally:  # A sitting that fails or is interrupted still counts.
      wall["seconds"] += time.perf_counter() - start
      wall_path.write_text(json.dumps(wall))
  return json.loads((workdir / "summary.json").read_text()) | {"wall_seconds": wall["seconds"]}


def _num(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def family_rows(name: str, summary) -> list[str]:
  first, last = summary["rounds"][0], summary["rounds"][-1]
  strategy = name.split(" / ")[0]
  singles = [n for n in first["singles"]]
  rows = []
  for family in sorted(summary["composition"]):
    def mean(m):
      return sum(m["by_task"][n].get(family, 0.0) for n in singles) / len(singles)
    base = first["baselines"].get("by_subject", {}).get(family, {})
    if "mc_rows" in base:  # Multiple choice: chance and the majority class's rate.
      chance, majority = base["chance"], base["majority_class"]["rate"]
    else:  # Generated answers: chance 0, the majority answer's rate.
      gen = base.get("generation", {})
      chance = gen.get("chance", float("nan"))
      majority = gen.get("majority_answer", {}).get("rate", float("nan"))
    rows.append(f"| {name} | {family} | {summary['composition'][family]} | "
                f"{chance:.3f} | {majority:.3f} | "
                f"{mean(first):.3f} | {mean(last):.3f} | "
                f"{first['by_task'][strategy].get(family, 0.0):.3f} | "
                f"{last['by_task'][strategy].get(family, 0.0):.3f} |")
  return rows


def page(config, config_name: str, runs: dict[str, dict], refused: dict[str, str],
         quick: bool) -> str:
  total = sum(s["wall_seconds"] for s in runs.values())
  some = next(iter(runs.values()))
  rounds = some["paired"]["rounds"][1]
  comp = ", ".join(f"{k} {v}" for k, v in some["composition"].items())
  head = ["| strategy / method | single mean r0 -> last | singles change [95% CI] | "
          "collaboration r0 -> last | collaboration change [95% CI] | r0 collaboration - best "
          "single [95% CI] | collapses | wall |", "|---" * 8 + "|"]
  rows, sentences, families = [], [], []
  for name, s in runs.items():
    p, first, last = s["paired"], s["rounds"][0], s["rounds"][-1]
    rows.append(f"| {name} | {first['single_mean']:.3f} -> {last['single_mean']:.3f} | "
                f"{_ci(p['single_mean'])} | {first['collab']:.3f} -> {last['collab']:.3f} | "
                f"{_ci(p['collab'])} | {_ci(p['collab_vs_best_single_round0'])} | "
                f"{len(s['collapse'])} | {s['wall_seconds'] / 60:.1f} min |")
    sentences.append(f"- **{name}**: {sentence(s)}" + (
        " Collapses: " + "; ".join(f"round {c['round']} {c['model']} ({c['share']:.0%} one "
                                   "answer)" for c in s["collapse"]) + "."
        if s["collapse"] else ""))
    families += family_rows(name, s)
  parts = ("singles", "collaboration", "fit", "base", "rest")
  times = [f"| {name} | {s['wall_seconds'] / 60:.1f} | " + (" | ".join(
      [f"{s['seconds']['total'] / 60:.1f}"]
      + [f"{s['seconds']['parts'].get(k, 0.0) / 60:.1f}" for k in parts])
      if s.get("seconds") else " | ".join("-" * 6)) + " |" for name, s in runs.items()]
  skipped = "".join(f"\n- {k}: {v}" for k, v in refused.items())
  spec = some.get("specialists", {})
  specialists = ("\nThe specialists on their own family's test rows at round 0, against the base "
                 "they were fine-tuned from (from the first run; every run shares them):\n\n"
                 "| specialist | family | base | specialist |\n|---|---|---|---|\n" + "".join(
                     f"| {n} | {v['task']} | {_num(v['base'])} | {_num(v['score'])} |\n"
                     for n, v in spec.items())) if spec else ""
  return f"""## The loop per strategy and distillation method (made by `python scripts/results.py{' --quick' if quick else ''}`)

Config: `configs/{config_name}` (pool {', '.join(config.pool)}{'; specialists: ' + ', '.join(config.specialists) if config.specialists else ''}), {rounds} round(s),
task `{config.task}`; test rows per family: {comp}; {config.dev_examples} dev rows. Every change is
paired on the same test rows (last round minus round 0; percentile bootstrap, 1000 resamples);
"up" means the CI's lower end is above 0. Total wall time {total / 60:.1f} min on this machine.

{specialists}
{chr(10).join(head + rows)}

Against the paper's two directions (single models improve; the next collaboration improves):

{chr(10).join(sentences)}

Per task family (single mean over the pool, and the collaboration), with the family's chance
level and majority rate (multiple choice: the most common gold letter's share; generated answers:
chance 0, and the exact-match score of always giving the most common gold answer):

| strategy / method | family | test rows | chance | majority class | singles r0 | singles last | collaboration r0 | collaboration last |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(families)}

Where the time went, in minutes (the loop's stages from its `timings.jsonl`; wall: every sitting
of the run, with loading, the first run's specialists and writing). singles / collaboration: their
decoding and scoring on every split; fit: fitting the strategy; base: the base model on the
specialists' families; rest: the remainder of the stages, mostly distillation's training:

| strategy / method | wall | loop stages | singles | collaboration | fit | base | rest |
|---|---|---|---|---|---|---|---|
{chr(10).join(times)}
""" + (f"\nNot run (refused by the loop's validation):{skipped}\n" if refused else "")


TARGETS = "issue 17 item 4"


def _time_log(path) -> tuple[str, float] | None:
  """(wall clock, peak RSS in GB) from a `/usr/bin/time -v` log, or None."""
  if not path:
    return None
  text = pathlib.Path(path).read_text()
  wall = text.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split()[0]
  rss = int(text.split("Maximum resident set size (kbytes): ")[1].split()[0]) / 1e6
  return wall, rss


def default_section(workdir: pathlib.Path, time_log: str | None) -> str:
  """The embedded default's run (the README's first command) from its workdir: specialists
  against the base, every round per model and family, the paired changes, collapses, and each of
  the targets met or not, judged from the paired CIs."""
  config = json.loads((workdir / "config.json").read_text())
  summary = json.loads((workdir / "summary.json").read_text())
  if summary.get("evaluated_on", "test") != "test":
    raise SystemExit(f"{workdir} evaluated validation rows (evaluate_on="
                     f"{summary['evaluated_on']!r}): the page reports test rows")
  rounds, p = summary["rounds"], summary["paired"]
  first = rounds[0]
  names, strategy = list(first["singles"]), config["strategy"]
  families = list(summary["composition"])
  gen = first["baselines"].get("by_subject", {})

  def fam_base(f):
    g = gen.get(f, {}).get("generation")
    return (f"chance 0, majority answer {g['majority_answer']['rate']:.3f}" if g
            else "no baseline recorded")

  lines = ["| round | model | score [95% CI] | " + " | ".join(families) + " |",
           "|---" * (3 + len(families)) + "|"]
  for m in rounds:
    for n in names + [strategy]:
      ci = m["singles_ci95"][n] if n in names else m["collab_ci95"]
      score = m["singles"][n] if n in names else m["collab"]
      lines.append(f"| {m['round']} | {n} | {score:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                   + " | ".join(f"{m['by_task'][n].get(f, float('nan')):.3f}" for f in families)
                   + " |")
  spec = summary.get("specialists", {})
  spec_rows = "".join(f"| {n} | {v['task']} | {_num(v['base'])} | {_num(v['score'])} | "
                      f"{_num(None if v['base'] is None else v['score'] - v['base'])} |\n"
                      for n, v in spec.items())
  margins = [v["score"] - v["base"] for v in spec.values()
             if v["base"] is not None and v["score"] is not None]
  timing = _time_log(time_log)
  c0, s_mean, collab = (p["collab_vs_best_single_round0"], p["single_mean"], p["collab"])
  checks = [
      ("every specialist >= 15 points over the base on its family",
       bool(margins) and len(margins) == len(spec) and min(margins) >= 0.15,
       f"smallest margin {min(margins):+.3f}" if margins else "not recorded"),
      ("round-0 collaboration >= 8 points over the best single, paired CI above 0",
       c0["delta"] >= 0.08 and c0["ci95"][0] > 0, _ci(c0)),
      ("single-model mean >= 8 points above round 0 after the rounds, paired CI above 0",
       s_mean["delta"] >= 0.08 and s_mean["ci95"][0] > 0, _ci(s_mean)),
      ("final collaboration at least the round-0 collaboration", collab["delta"] >= 0,
       _ci(collab)),
      ("no collapse warning", not summary["collapse"],
       f"{len(summary['collapse'])} collapse(s)"),
      (">= 300 test rows, >= 100 per family",
       sum(summary["composition"].values()) >= 300 and min(summary["composition"].values()) >= 100,
       ", ".join(f"{k} {v}" for k, v in summary["composition"].items()))]
  if timing:
    minutes = sum(float(x) * 60 ** i for i, x in enumerate(reversed(timing[0].split(":")))) / 60
    checks.append(("within 15 minutes and 8 GB peak RSS on 2 cores",
                   minutes <= 15 and timing[1] <= 8, f"{timing[0]} wall, {timing[1]:.2f} GB"))
  check_rows = "".join(f"| {what} | {'met' if ok else '**not met**'} | {how} |\n"
                       for what, ok, how in checks)
  return f"""## The embedded default (made by `python scripts/results.py --default_run=W`)

The README's first command, `python -m single_multi.main --config=configs/quickstart.py
--workdir=W`: three SmolLM2-135M-Instruct specialists ({", ".join(config["specialists"])}), each
a LoRA fine-tune ({config["specialist_steps"]} steps, lr {config["specialist_learning_rate"]},
{config["specialist_examples"]} rows of its family's dev split that are neither among the loop's
dev rows nor its test rows). The pool collaborates by `{strategy}` (config
{config["strategy_config"]}{f", fitted on {config['fit_examples']} other held-out dev rows" if config.get("fit_examples") else ""}) on {config["dev_examples"]} dev rows, distils{" its correct answers" if config["distill"].get("correctness_filter") else ""}
(`{config["distill"]["method"]}`, LoRA r={config["distill"]["lora_rank"]}, lr
{config["distill"]["learning_rate"]}, batch {config["distill"]["batch_size"]},
{config["distill"]["epochs"]} epochs), {len(rounds) - 1} round(s); greedy decoding, at most
{config["max_new_tokens"]} new tokens, exact match. Families and every hyperparameter were chosen on
dev rows only (configs/quickstart.py's docstring says which). Test rows per family:
{", ".join(f"{k} {v} ({fam_base(k)})" for k, v in summary["composition"].items())}.
{f"Wall time {timing[0]}, peak RSS {timing[1]:.2f} GB (`/usr/bin/time -v`), 2 CPU cores." if timing else ""}

The specialists on their own family's test rows (round 0) against the base:

| specialist | family | base | specialist | margin |
|---|---|---|---|---|
{spec_rows}
Every model per round (score with its bootstrap 95% CI, then per family):

{chr(10).join(lines)}

Paired on the same {s_mean["n"]} test rows (round {p["rounds"][1]} minus round {p["rounds"][0]};
paired bootstrap 95% CI): single-model mean {_ci(s_mean)}; collaboration {_ci(collab)};
{"; ".join(f"{n} {_ci(d)}" for n, d in p["singles"].items())}. Round 0: collaboration minus the
best single ({p["best_single_round0"]}) {_ci(c0)}.

Against the targets ({TARGETS}):

| target | | measured |
|---|---|---|
{check_rows}"""


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--strategies", default=STRATEGIES)
  parser.add_argument("--methods", default="", help="default: every method the loop accepts "
                      "with each strategy (supervised_kd only with --quick)")
  parser.add_argument("--config", default="quickstart.py")
  parser.add_argument("--rounds", type=int, default=0, help="0: the config's")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--workdir", default="/tmp/single_multi_results")
  parser.add_argument("--output", default=str(ROOT / "docs" / "results.md"))
  parser.add_argument("--page_only", action="store_true",
                      help="write the page from the finished workdirs, run nothing")
  parser.add_argument("--default_run", default="",
                      help="a finished quickstart workdir: write its section and stop")
  parser.add_argument("--default_time_log", default="",
                      help="the `/usr/bin/time -v` output of that run (wall time, peak RSS)")
  args = parser.parse_args()
  if args.default_run:
    from doc_sections import write_section
    text = default_section(pathlib.Path(args.default_run), args.default_time_log or None)
    write_section(pathlib.Path(args.output), "quickstart_default", text)
    print(text)
    return
  sys.path.insert(0, str(ROOT))
  from ml_collections import config_dict
  from single_multi import configs, distill, evolve

  def config_for(strategy, method):
    c = configs.load(ROOT / "configs" / args.config)
    if strategy != c.strategy:  # The config's strategy overrides are for its own strategy.
      c.strategy_config = config_dict.ConfigDict()
    c.strategy, c.distill.method = strategy, method
    if args.rounds:
      c.rounds = args.rounds
    if args.quick:
      c.rounds, c.test_examples, c.dev_examples = 1, min(c.test_examples, QUICK_ROWS[0]), min(
          c.dev_examples, QUICK_ROWS[1])
      if c.get("fit_examples"):
        c.fit_examples = min(c.fit_examples, QUICK_ROWS[1])
    return c

  methods = (args.methods.split(",") if args.methods else
             ["supervised_kd"] if args.quick else list(distill.METHODS))
  if not args.page_only:  # Every run after the first reads the programs the first compiled.
    from single_multi import assets
    assets.enable_compilation_cache(configs.load(ROOT / "configs" / args.config).jax_cache_dir)
  root = pathlib.Path(args.workdir) / ("quick" if args.quick else "full")
  runs, refused = {}, {}
  for strategy in args.strategies.split(","):
    for method in methods:
      name, c = f"{strategy} / {method}", config_for(strategy, method)
      try:
        evolve.validate(c)
      except evolve.ConfigError as e:
        refused[name] = str(e).split(";")[0]
        continue
      workdir = root / f"{strategy}-{method}"
      c.eval_cache = str(root / "eval_cache")  # The runs share round 0 (eval_memo.py).
      if args.page_only:
        if (workdir / "summary.json").exists():
          wall = json.loads((workdir / "wall.json").read_text())["seconds"]
          runs[name] = json.loads((workdir / "summary.json").read_text()) | {
              "wall_seconds": wall}
        continue
      runs[name] = run_one(c, workdir, root / "specialists")
      print(f"{name}: {sentence(runs[name])} ({runs[name]['wall_seconds'] / 60:.1f} min)",
            flush=True)
  text = page(config_for(args.strategies.split(",")[0], methods[0]), args.config, runs, refused,
              args.quick)
  from doc_sections import write_section
  write_section(pathlib.Path(args.output), "quickstart_loop", text)
  print(text)
  print(json.dumps({"runs": len(runs), "refused": len(refused),
                    "wall_minutes": round(sum(s["wall_seconds"] for s in runs.values()) / 60, 1)}))


if __name__ == "__main__":
  main()
