"""What a run reports: each round's metrics and its console table, the collapse check, the
plots and TensorBoard scalars, and summary.json's paired statistics."""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
from etils import epath

from single_multi import evaluate
from single_multi.data import common

COLLAPSE_SHARE = 0.9  # A model giving one answer to this share of the rows has collapsed...


def top_share(values: Sequence[Any]) -> float:
  """The share of the most frequent value (None counts as a value: no answer)."""
  if not values:
    return 0.0
  counts: dict[str, int] = {}
  for v in values:
    counts[json.dumps(v)] = counts.get(json.dumps(v), 0) + 1
  return max(counts.values()) / len(values)


def _gold(r: dict[str, Any]):
  t = r.get("target")
  return t[0] if isinstance(t, list) and t else t


def collapsed(m: dict[str, Any]) -> list[dict[str, Any]]:
  """... unless the gold answers are that uniform too (`COLLAPSE_SHARE`)."""
  if m.get("gold_top_share", 1.0) >= COLLAPSE_SHARE:  # (Or a history from before the field.)
    return []
  return [{"round": m["round"], "model": k, "share": v}
          for k, v in m.get("top_answer_share", {}).items() if v >= COLLAPSE_SHARE]


def round_metrics(round_: int, singles: evaluate.EvalResult, collab_r: evaluate.EvalResult,
                  names: Sequence[str], strategy: str) -> dict[str, Any]:
  s = {n: singles.summary["models"][n]["score"] for n in names}
  c = collab_r.summary["models"][strategy]["score"]
  best = max(names, key=lambda n: s[n]["mean"])
  records = singles.records + collab_r.records
  by_model = {n: [r for r in records if r["model"] == n] for n in (*names, strategy)}
  return {"round": round_, "singles": {n: v["mean"] for n, v in s.items()},
          "by_task": {n: r.summary["models"][n]["by_subject"]
                      for r, ns in ((singles, names), (collab_r, (strategy,))) for n in ns},
          "top_answer_share": {n: top_share([r.get("prediction") for r in rows])
                               for n, rows in by_model.items()},
          "gold_top_share": top_share([_gold(r) for r in by_model[strategy]]),
          "singles_ci95": {n: v["ci95"] for n, v in s.items()},
          "single_mean": float(np.mean([v["mean"] for v in s.values()])),
          "best_single": s[best]["mean"], "best_single_model": best,
          "collab": c["mean"], "collab_ci95": c["ci95"], "n": c["n"],
          "baselines": singles.summary["baselines"],
          "answer_positions": {n: r.summary["models"][n]["answer_positions"]
                               for r, ns in ((singles, names), (collab_r, (strategy,)))
                               for n in ns}}


def format_round(m: dict[str, Any]) -> str:
  lo, hi = m["collab_ci95"]
  lines = [f"round {m['round']}: single mean {m['single_mean']:.3f}  best single "
           f"{m['best_single']:.3f} ({m['best_single_model']})  collaboration {m['collab']:.3f} "
           f"[{lo:.3f}, {hi:.3f}]  (n={m['n']})"]
  for n, v in m["singles"].items():
    a, b = m["singles_ci95"][n]
    lines.append(f"    {n:28s} {v:.3f} [{a:.3f}, {b:.3f}]")
  if len(next(iter(m.get("by_task", {}).values()), {})) > 1:
    for n, by in m["by_task"].items():
      lines.append(f"    {n:28s} by task: " + ", ".join(f"{k} {v:.3f}" for k, v in by.items()))
  base = m.get("baselines") or {}
  lines += [f"    {line}" for line in evaluate.baseline_lines(base)]
  if "mc_rows" in base:
    for n, shares in m["answer_positions"].items():
      lines.append(f"    {n:28s} answers " + " ".join(f"{k} {v:.0%}" for k, v in shares.items()))
  return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Outputs a user plots.


def write_metrics(workdir: epath.Path, history: list[dict[str, Any]],
                  split: str = "test") -> None:
  """metrics.jsonl (one line per round), TensorBoard events (the newest round), accuracy.png;
  `split`: the rows scored ("test", or "validation" under evaluate_on), named in the TensorBoard
  tags and the plot."""
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
  import tensorboardX
  from matplotlib.figure import Figure

  m = history[-1]  # Events are appended round by round (earlier rounds are already written).
  with tensorboardX.SummaryWriter(str(workdir / "tensorboard")) as w:
    w.add_scalar(f"{split}/collaboration", m["collab"], m["round"])
    w.add_scalar(f"{split}/single_mean", m["single_mean"], m["round"])
    w.add_scalar(f"{split}/best_single", m["best_single"], m["round"])
    for n, v in m["singles"].items():
      w.add_scalar(f"{split}/single/{n.replace(':', '_')}", v, m["round"])
    for n, by in m.get("by_task", {}).items():
      for t, v in by.items():
        w.add_scalar(f"{split}_by_task/{t.replace(':', '_')}/{n.replace(':', '_')}", v, m["round"])
  rounds = np.asarray([m["round"] for m in history], np.float64)
  fig = Figure(figsize=(6, 4))  # No pyplot: the caller's backend stays as it is.
  ax = fig.subplots()
  series = [(n, [h["singles"][n] for h in history], [h["singles_ci95"][n] for h in history], "s")
            for n in m["singles"]]
  series.append(("collaboration", [h["collab"] for h in history],
                 [h["collab_ci95"] for h in history], "o"))
  width = 0.08 * (len(series) - 1)
  for k, (name, means, cis, marker) in enumerate(series):  # Offsets keep the bars apart.
    x = rounds + (k * 0.08 - width / 2 if len(series) > 1 else 0.0)
    means = np.asarray(means)
    err = np.abs(np.asarray(cis, np.float64).T - means)
    ax.errorbar(x, means, yerr=err, fmt=marker + ("-" if name == "collaboration" else "--"),
                capsize=3, label=name, lw=2 if name == "collaboration" else 1)
  base = m.get("baselines") or {}
  if "mc_rows" in base:  # What answering without reading the question scores.
    ax.axhline(base["chance"], ls=":", color="gray", label="chance (multiple choice)")
    ax.axhline(base["majority_class"]["rate"], ls="-.", color="silver",
               label=f"majority class ({base['majority_class']['letter']})")
  if gen := base.get("generation"):  # Exact match: chance 0; always the most common answer.
    ax.axhline(0.0, ls=":", color="black", label="chance (generated answers)")
    ax.axhline(gen["majority_answer"]["rate"], ls="-.", color="tan",
               label="majority answer")
  ax.set_xlabel("round")
  ax.set_ylabel(f"{split} score")
  ax.set_xticks(rounds)
  ax.set_title(f"{split} score, 95% bootstrap CIs", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with (workdir / "accuracy.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=120)


def _row_scores(directory: epath.Path) -> dict[str, dict[str, float]]:
  """{model: {example id: score}} of an evaluation's records.jsonl."""
  out: dict[str, dict[str, float]] = {}
  path = directory / "records.jsonl"
  if not path.exists():
    return out
  for line in path.read_text().splitlines():
    r = json.loads(line)
    if r.get("score") is not None:
      out.setdefault(r["model"], {})[r["id"]] = float(r["score"])
  return out


def _paired(after: dict[str, float], before: dict[str, float]) -> dict[str, Any]:
  ids = sorted(set(after) & set(before))
  a, b = [after[i] for i in ids], [before[i] for i in ids]
  if not ids:
    return {"delta": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
  return {"delta": float(np.mean(a) - np.mean(b)),
          "ci95": list(evaluate.paired_bootstrap_ci(a, b)), "n": len(ids)}


def run_summary(workdir, history, names, strategy, test) -> dict[str, Any]:
  """summary.json: the test composition, every round's metrics, the paired changes from round
  0 to the last round on the same test rows (single-model mean, each single, the collaboration)
  and the round-0 collaboration minus the round-0 best single (best on test, as printed), with
  paired bootstrap 95% CIs, each specialist's base and own score on its family (a pool built from
  specialists), every collapse (a model giving one answer to >= 90% of the
  rows while the gold answers are not that uniform) and where the time went (`time_summary`)."""
  workdir = epath.Path(workdir)
  first, last = history[0]["round"], history[-1]["round"]
  s0 = _row_scores(workdir / f"round_{first}" / "singles")
  s1 = _row_scores(workdir / f"round_{last}" / "singles")
  c0 = _row_scores(workdir / f"round_{first}" / "collaboration").get(strategy, {})
  c1 = _row_scores(workdir / f"round_{last}" / "collaboration").get(strategy, {})

  def mean_over(scores):
    ids = set.intersection(*(set(scores.get(n, {})) for n in names)) if names else set()
    return {i: float(np.mean([scores[n][i] for n in names])) for i in ids}

  best0 = history[0]["best_single_model"]
  paired = {"rounds": [first, last], "single_mean": _paired(mean_over(s1), mean_over(s0)),
            "singles": {n: _paired(s1.get(n, {}), s0.get(n, {})) for n in names},
            "collab": _paired(c1, c0),
            "collab_vs_best_single_round0": _paired(c0, s0.get(best0, {})),
            "best_single_round0": best0}
  return {"composition": common.composition(test), "rounds": history, "paired": paired,
          "specialists": history[0].get("specialists", {}),
          "collapse": [c for m in history for c in collapsed(m)],
          "seconds": time_summary(read_timings(workdir))}


TIMINGS = "timings.jsonl"


def read_timings(workdir) -> list[dict[str, Any]]:
  """The workdir's finished stages' timings (`write_timings`); [] when there are none."""
  path = epath.Path(workdir) / TIMINGS
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_timings(workdir, timings: list[dict[str, Any]]) -> None:
  """timings.jsonl: per finished stage (in order, over every sitting of a resumed run) its round,
  name, wall seconds and their parts (`evolve.Stopwatch`). Rewritten whole (a bucket path
  cannot be appended to)."""
  (epath.Path(workdir) / TIMINGS).write_text("".join(json.dumps(t) + "\n" for t in timings))


def time_summary(timings: list[dict[str, Any]]) -> dict[str, Any]:
  """Where the time went: total wall seconds of the finished stages, per stage name, and per part
  (decoding and scoring of the singles, the collaboration, the strategy's fit, the base model;
  "rest": the remainder of each stage, in a distill stage its training)."""
  stages: dict[str, float] = {}
  parts: dict[str, float] = {}
  for t in timings:
    stages[t["stage"]] = stages.get(t["stage"], 0.0) + t["seconds"]
    for k, v in t["parts"].items():
      parts[k] = parts.get(k, 0.0) + v
    parts["rest"] = parts.get("rest", 0.0) + t["seconds"] - sum(t["parts"].values())
  return {"total": sum(stages.values()), "stages": stages, "parts": parts}


def format_time(seconds: dict[str, Any]) -> str:
  """One line: the total and its split by stage and by part, in minutes."""
  m = lambda d: ", ".join(f"{k} {v / 60:.1f}" for k, v in d.items())
  return (f"time: {seconds['total'] / 60:.1f} min (stages: {m(seconds['stages'])}; "
          f"parts: {m(seconds['parts'])})")


def format_paired(summary: dict[str, Any]) -> str:
  p = summary["paired"]
  f = lambda d: f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (n={d['n']})"
  first, last = p["rounds"]
  split = summary.get("evaluated_on", "test")
  lines = [f"paired on the same {split} rows, round {last} vs round {first} (95% bootstrap CI):",
           f"    single-model mean     {f(p['single_mean'])}",
           *[f"    {n:21s} {f(d)}" for n, d in p["singles"].items()],
           f"    collaboration         {f(p['collab'])}",
           f"  round {first}: collaboration - best single ({p['best_single_round0']}) "
           f"{f(p['collab_vs_best_single_round0'])}"]
  for n, v in summary.get("specialists", {}).items():
    if v["base"] is not None and v["score"] is not None:
      lines.append(f"  specialist {n}: {v['score']:.3f} on its family vs the base's "
                   f"{v['base']:.3f} ({v['score'] - v['base']:+.3f})")
  for c in summary["collapse"]:
    lines.append(f"  COLLAPSE: round {c['round']} {c['model']} gives one answer to "
                 f"{c['share']:.0%} of the {split} rows")
  if summary.get("seconds"):
    lines.append(format_time(summary["seconds"]))
  return "\n".join(lines)
