"""The embedded Co-LLM job's test table, written into its section of docs/results.md.

  python scripts/co_llm_table.py [--workdir=/tmp/co_llm_demo] [--config=configs/co_llm_bigbench.py]

Runs the job (`python -m single_multi.main --config=configs/co_llm_bigbench.py`) in --workdir
unless that workdir already holds its results.json, then writes the table (per system: score,
95% CI, deferral rate) with the calibration sweep.
"""

import argparse
import json
import shutil
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="/tmp/co_llm_demo")
  parser.add_argument("--config", default=str(ROOT / "configs" / "co_llm_bigbench.py"))
  parser.add_argument("--output", default=str(ROOT / "docs" / "results.md"))
  parser.add_argument("--note", default="", help="a paragraph added under the description "
                      "(how the setting was chosen, what the run shared the machine with)")
  args = parser.parse_args()
  from doc_sections import write_section

  results = pathlib.Path(args.workdir) / "results.json"
  if not results.exists():
    subprocess.run([sys.executable, "-m", "single_multi.main", f"--config={args.config}",
                    f"--workdir={args.workdir}"], cwd=ROOT, check=True)
  out = json.loads(results.read_text())
  sys.path.insert(0, str(ROOT))
  from single_multi import evaluate
  if "baselines" not in out:  # A results.json from before the job wrote them: same rows, no model.
    from single_multi import co_llm_run, configs
    from single_multi.data import tasks
    config = configs.load(args.config)
    task = tasks.from_config(config.task, config)
    split = co_llm_run.split_rows(task.dev, task.test, config)
    out["baselines"] = evaluate.baselines(split["test"], split["train"], "train")
  chance = " ".join(f"Test rows without reading the questions: {line}."
                    for line in evaluate.baseline_lines(out["baselines"]))
  fams = list(out["composition"]["test"])
  short = [f.split("/")[-1] for f in fams]
  with_deferral = all("per_task_deferral" in s for s in out["summary"].values())
  rows = [f"| {name} | {s['score']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | "
          + "".join(f"{s['per_task'][f]:.3f} | " for f in fams)
          + f"{s['deferral']:.1%} | "
          + "".join(f"{s['per_task_deferral'][f]:.1%} | " for f in fams if with_deferral)
          + f"{s['n']} |" for name, s in out["summary"].items()]
  paired = "\n".join(f"| {k.replace('_vs_', ' minus ')} | {v['delta']:+.3f} "
                     f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] |"
                     for k, v in out["paired"].items())
  png = pathlib.Path(args.output).parent / "co_llm_calibration.png"
  shutil.copyfile(pathlib.Path(args.workdir) / "calibration.png", png)
  sweep = ", ".join(f"{r['rate']:.0%}: {r['score']:.3f}" for r in out["calibration"]["co_llm"])
  note = f"\n{args.note}\n" if args.note else ""
  families = ", ".join(f"{k} {v}" for k, v in out["composition"]["test"].items())
  asst_rows = ", ".join(f"{k} {v}" for k, v in out["composition"]["assistant"].items())
  validation = ", ".join(f"{k} {v:.3f}" for k, v in out["validation"].items())
  rows_used = ", ".join(f"{k} {v}" for k, v in out["rows"].items())
  cfg = out.get("config") or {}
  base_rows = ", ".join(f"{k} {v}" for k, v in out["composition"].get("base", {}).items())
  base_text = (f"a SmolLM2-135M-Instruct specialist fine-tuned on dev rows of its own "
               f"({base_rows})" if base_rows else "SmolLM2-135M-Instruct")
  trains = {"gate": "the gate alone (the base frozen)", "lora": "the gate and a LoRA of the base",
            "full": "the gate and the whole base"}.get(cfg.get("train", {}).get("base"),
                                                       "the gate and the base")
  page = f"""## Co-LLM on the embedded models (made by `python scripts/co_llm_table.py`)

`configs/co_llm_bigbench.py` on {out['task']}: the base is {base_text}; the assistant a SmolLM2
specialist fine-tuned on dev rows of another family ({asst_rows}); Co-LLM trains {trains} on
both families. Rows (disjoint, checked by id): {rows_used};
test rows per family: {families}. Greedy decoding;
deferral = share of generated tokens written by the assistant. `base`: the base before Co-LLM (not deferring);
`trained_base`: the base as Co-LLM trained it, never deferring; `random_deferral`: base and
assistant with each token deferred at random at Co-LLM's calibrated rate. 95% CIs: percentile
bootstrap over the rows; differences: paired bootstrap over the same test rows. {chance}
{note}
| system | score [95% CI] | """ + "".join(f"{f} | " for f in short) + """deferral | """ + (
    "".join(f"deferral {f} | " for f in short) if with_deferral else "") + """n |
|---|---|""" + "---:|" * len(fams) + "---:|" + ("---:|" * len(fams) if with_deferral else "") + """---:|
""" + "\n".join(rows) + """

| difference | delta [paired 95% CI] |
|---|---|
""" + paired + f"""

Validation sweep (deferral rate: score) that picked eta {out['eta']['co_llm']:.6g}: {sweep}.
Every system on the validation rows: {validation}. Wall time of the job: {out['seconds'] / 60:.1f} min.

![score against deferral rate on the validation rows, 95% bootstrap CIs as error bars](co_llm_calibration.png)
"""
  write_section(pathlib.Path(args.output), "co_llm", page)
  print(page)


if __name__ == "__main__":
  main()
