"""The loop for several strategies x the distillation methods each supports, and its section of
docs/results.md.

  python scripts/results.py [--quick] [--strategies=trained_router,logit_fusion,...]
                            [--methods=supervised_kd,...] [--config=quickstart.py] [--rounds=N]
                            [--workdir=/tmp/single_multi_results] [--page_only]

Each (strategy, method) runs `evolve.run` in its own workdir (resumable: a rerun continues where
a killed one stopped; the wall time of every sitting is added up in `<workdir>/wall.json`); the
pool (the config's specialists) is built once and shared. A combination the loop refuses
(`evolve.validate`, e.g. logit_kd with a router) is listed with the reason, not run.

The page reports, per run, from its summary.json: the single-model mean and the collaboration at
round 0 and at the last round, the paired changes on the same test rows with paired bootstrap 95%
CIs, the round-0 collaboration minus the round-0 best single (paired), collapses, the wall time,
and one sentence on whether the paper's two directions appear (singles better after the rounds;
the last collaboration better than round 0's), judged by the paired CI: "up" only when its lower
end is above 0. Per task family: each run's single mean and collaboration at round 0 and at the
end, next to the family's chance level and majority-class rate.

--quick: supervised_kd only, at most 48 test and 32 dev rows per family, 1 round (about 30
minutes for the four default strategies on 2 cores); the full run's time is printed and written.
"""

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
STRATEGIES = "trained_router,logit_fusion,multiagent_refine,dare_ties"


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
    evolve.run(config, workdir, pools.build(config, workdir))
    wall["seconds"] += time.perf_counter() - start
    wall_path.write_text(json.dumps(wall))
  return json.loads((workdir / "summary.json").read_text()) | {"wall_seconds": wall["seconds"]}


def family_rows(name: str, summary) -> list[str]:
  first, last = summary["rounds"][0], summary["rounds"][-1]
  strategy = name.split(" / ")[0]
  singles = [n for n in first["singles"]]
  rows = []
  for family in sorted(summary["composition"]):
    def mean(m):
      return sum(m["by_task"][n].get(family, 0.0) for n in singles) / len(singles)
    base = first["baselines"].get("by_subject", {}).get(family, {})
    rows.append(f"| {name} | {family} | {summary['composition'][family]} | "
                f"{base.get('chance', float('nan')):.3f} | "
                f"{base.get('majority_class', {}).get('rate', float('nan')):.3f} | "
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
  skipped = "".join(f"\n- {k}: {v}" for k, v in refused.items())
  return f"""## The loop per strategy and distillation method (made by `python scripts/results.py{' --quick' if quick else ''}`)

Config: `configs/{config_name}` (pool {', '.join(config.pool)}{'; specialists: ' + ', '.join(config.specialists) if config.specialists else ''}), {rounds} round(s),
task `{config.task}`; test rows per family: {comp}; {config.dev_examples} dev rows. Every change is
paired on the same test rows (last round minus round 0; percentile bootstrap, 1000 resamples);
"up" means the CI's lower end is above 0. Total wall time {total / 60:.1f} min on this machine.

{chr(10).join(head + rows)}

Against the paper's two directions (single models improve; the next collaboration improves):

{chr(10).join(sentences)}

Per task family (single mean over the pool, and the collaboration), with the family's chance
level and majority-class rate on its multiple-choice rows:

| strategy / method | family | test rows | chance | majority class | singles r0 | singles last | collaboration r0 | collaboration last |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(families)}
""" + (f"\nNot run (refused by the loop's validation):{skipped}\n" if refused else "")


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
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  from single_multi import configs, distill, evolve

  def config_for(strategy, method):
    c = configs.load(ROOT / "configs" / args.config)
    c.strategy, c.distill.method = strategy, method
    if args.rounds:
      c.rounds = args.rounds
    if args.quick:
      c.rounds, c.test_examples, c.dev_examples = 1, min(c.test_examples, 48 * 3), min(
          c.dev_examples, 32 * 3)
    return c

  methods = (args.methods.split(",") if args.methods else
             ["supervised_kd"] if args.quick else list(distill.METHODS))
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
