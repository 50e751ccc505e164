"""The Co-LLM job: specialist assistant, gate init, training, calibration, evaluation, traces.

    python -m single_multi.main --config=configs/co_llm_bigbench.py --workdir=/tmp/co_llm

(`single_multi.main` is its one entry point.) Answers are scored as the loop scores them
(`evaluate.score_generated`).

1. The assistant: the configured model, or the base fine-tuned on its own dev rows (a
   specialist, `pools.finetuned`; cached in the workdir under a key of everything it is made
   from, reused when present).
2. The scoring passes over the gate's training sequences: the assistant's (gold log-probs,
   argmax-is-gold) and the original base's (argmax-is-gold: the fixed weak-supervision labels).
3. Gate init ("method a" by default, streamed in batches), then Co-LLM training (marginal
   likelihood, from the fitted gate) and the weak-supervision baseline (from the mean LM-head
   row, as the reference), each from the base. Schedules: `co_llm.CoLlmTrainConfig` (the
   reference's defaults; the embedded config states where it deviates).
4. Calibration on the validation rows: deferral rates 0%..90%, best eta kept; the same rate is
   used for the random-deferral baseline.
5. Test: base, assistant, random deferral, the trained base alone (Co-LLM's base, never
   deferring), weak supervision, Co-LLM: score with a bootstrap
   95% CI and deferral frequency, and Co-LLM minus each of the others on the same rows (paired
   bootstrap); results.json, table.txt, calibration.png, traces.jsonl/html, the checkpoint.
Rows never mix (`disjoint_rows` checks the ids before anything trains): per task family, the
last `val_fraction` of its dev rows is validation (calibration); of the rest, `assistant_examples`
rows (of the `assistant_subjects` families, all when empty) train the specialist assistant (none
when an assistant is configured) and `train_examples` others train the gate and the base; the test
split is evaluation. Every draw is balanced over the families and seeded (`split_rows`).
Questions whose text repeats across those sets (different rows, same wording) are counted in
results.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from single_multi import co_llm, collab, decoding, evaluate, pool as pool_lib, pools
from single_multi import train as train_lib
from single_multi.collab import core
from single_multi.data import common, pipeline, tasks
from single_multi.models import lora as lora_lib, loading


def _texts(tokenizer, out: core.Output) -> list[str]:
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokenizer.decode(tokens[b, :lengths[b]], skip_special_tokens=True)
          for b in range(tokens.shape[0])]


# Field -> (allowed?, what is allowed): checked before anything loads or trains.
RANGES: dict[str, tuple[Any, str]] = {
    "val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "target": (lambda v: v in ("answer", "solution"), "'answer' or 'solution'"),
    "train_examples": (lambda v: v >= 1, "an integer >= 1"),
    "assistant_examples": (lambda v: v >= 1, "an integer >= 1"),
    "base_examples": (lambda v: v >= 1, "an integer >= 1"),
    "specialist_lora_rank": (lambda v: v >= 0, "an integer >= 0 (0: full fine-tuning)"),
    "val_examples": (lambda v: v >= 1, "an integer >= 1"),
    "test_examples": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "assistant_steps": (lambda v: v >= 1, "an integer >= 1"),
    "assistant_learning_rate": (lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
    "train.base": (lambda v: v in ("full", "lora", "gate"), "'full', 'lora' or 'gate'"),
    "train.init": (lambda v: v in ("a", "b", "none"), "'a', 'b' or 'none'"),
    "train.steps": (lambda v: v >= 0, "an integer >= 0 (0: train.epochs)"),
    "train.epochs": (lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
    "train.schedule": (lambda v: v in train_lib.SCHEDULES, f"one of {train_lib.SCHEDULES}"),
    "train.init_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "train.init_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.init_learning_rate": (lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.lora_rank": (lambda v: v >= 1, "an integer >= 1"),
    "train.learning_rate": (lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
    "train.gate_learning_rate": (lambda v: np.isfinite(v) and v >= 0,
                                 "a finite number >= 0 (0: train.learning_rate)"),
    "train.warmup_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def validate(config: config_dict.ConfigDict) -> None:
  """Every Co-LLM job field checked before the base loads or the assistant is fine-tuned; a
  failure names the field, the value and what is allowed (evolve.ConfigError)."""
  from single_multi import configs, evolve
  fields = configs.leaves(config)
  for name, (ok, allowed) in RANGES.items():
    value = fields.get(name)
    if value is not None and not ok(value):
      raise evolve.ConfigError(f"{name}={value!r} is not allowed: give {allowed}")
  tasks.parse_name(config.task)


def disjoint_rows(named: dict[str, Sequence[Any]]) -> dict[str, int]:
  """Raises ValueError when a row id is in two of the named row sets; returns, per pair of sets,
  how many rows share a question's text with a row of the other (distinct rows, same wording)."""
  seen: dict[str, str] = {}
  for name, rows in named.items():
    for e in rows:
      if seen.setdefault(e.id, name) != name:
        raise ValueError(f"row {e.id} is in both the {seen[e.id]} rows and the {name} rows: "
                         "the assistant, gate-training, validation and test rows must not mix")
  texts = {name: {e.question for e in rows} for name, rows in named.items()}
  names = list(named)
  return {f"{a}/{b}": len(texts[a] & texts[b]) for i, a in enumerate(names)
          for b in names[i + 1:] if texts[a] & texts[b]}


def split_rows(dev: Sequence[Any], test: Sequence[Any], config) -> dict[str, list[Any]]:
  """{assistant, base, train, validation, test} rows as the module docstring says (problem rows
  out; "base" only with `base_subjects`).

  Per task family (subject), the last `val_fraction` of its dev rows are validation; the rest are
  training rows, of which the assistant takes `assistant_examples` from the families named in
  `assistant_subjects` (all when empty), the base specialist `base_examples` of the others from
  the families in `base_subjects`, and the gate the next `train_examples`. Every draw is
  `common.balanced`: even over the families, in a seeded order fixed by the row ids."""
  by: dict[str, list[Any]] = {}
  for e in dev:
    if not e.problem:
      by.setdefault(e.subject, []).append(e)
  rest, val = [], []
  for rows in by.values():
    n_val = max(1, int(round(len(rows) * config.val_fraction)))
    rest += rows[:len(rows) - n_val]
    val += rows[len(rows) - n_val:]
  out: dict[str, list[Any]] = {}
  taken: set[str] = set()
  roles = [("assistant", 0 if config.assistant else config.assistant_examples)]
  if config.get("base_subjects"):
    roles.append(("base", config.base_examples))
  for role, n in roles:
    wanted = tuple(config.get(f"{role}_subjects") or ())
    unknown = sorted(set(wanted) - set(by))
    if unknown:
      raise ValueError(f"{role}_subjects {unknown} are not task families of this task "
                       f"(families: {sorted(by)})")
    pool = [e for e in rest if e.id not in taken and (not wanted or e.subject in wanted)]
    out[role] = common.balanced(pool, n, config.seed) if n else []
    if len(out[role]) < n:
      raise ValueError(f"{len(out[role])} dev rows outside validation for the {role}: too few "
                       f"for {role}_examples={n}")
    taken |= {e.id for e in out[role]}
  gate = common.balanced([e for e in rest if e.id not in taken], config.train_examples,
                         config.seed)
  if not gate:
    raise ValueError(f"no dev rows left for gate training after the specialists' "
                     f"{len(taken)} rows")
  return out | {"train": gate,
                "validation": common.balanced(val, config.val_examples, config.seed),
                "test": common.balanced(test, config.test_examples, config.seed)}


def training_target(kind: str, split: dict[str, list[Any]]):
  """example -> training text: "answer" (the gold answer) or "solution" (the worked solution,
  as the reference trains GSM8K; every assistant and gate-training row must have one)."""
  if kind == "answer":
    return pipeline.gold_answer
  missing = [e.id for k in ("assistant", "base", "train") for e in split.get(k, ())
             if not e.solution]
  if missing:
    raise ValueError(f"target='solution' but {len(missing)} training rows have no worked "
                     f"solution (first: {missing[0]}); this task's source has none: use "
                     "target='answer'")
  return lambda e: e.solution


def train_config(config, lora) -> co_llm.CoLlmTrainConfig:
  """The job's `train.*` fields as a CoLlmTrainConfig."""
  t = config.train
  optim = train_lib.OptimConfig(learning_rate=t.learning_rate, schedule=t.schedule,
                                warmup_fraction=t.warmup_fraction, weight_decay=0.0)
  return co_llm.CoLlmTrainConfig(
      train_base=t.base, lora=lora or lora_lib.LoraConfig(), optim=optim,
      gate_learning_rate=t.gate_learning_rate or None, epochs=t.epochs, steps=t.steps,
      batch_size=t.batch_size, init=t.init, init_epochs=t.init_epochs,
      init_batch_size=t.init_batch_size, init_learning_rate=t.init_learning_rate,
      seed=config.seed)


def run(config: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  start = time.perf_counter()
  stages: dict[str, float] = {}

  def stage(name: str) -> None:  # Seconds since the previous mark, logged and in results.json.
    stages[name] = time.perf_counter() - start - sum(stages.values())
    logging.info("co_llm stage %s: %.1f s", name, stages[name])

  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  dtype = jnp.dtype(config.dtype)
  base = loading.load(config.base, dtype)
  tok = base.tokenizer
  task = tasks.from_config(config.task, config)
  split = split_rows(task.dev, task.test, config)
  same_text = disjoint_rows(split)
  train_rows, val_rows, test = split["train"], split["validation"], split["test"]
  prompt = pipeline.PromptConfig(k_shot=0, gen_instruction=config.instruction)
  prompter = pipeline.Prompter(tok, prompt)
  eos = decoding.stop_ids_for(base.config, tok)[0]
  target = training_target(config.target, split)
  tokens, mask, loss_mask = pipeline.sft_rows(prompter, train_rows,
                                              [target(e) for e in train_rows], eos)
  logging.info("%s: %s rows", task.name, {k: len(v) for k, v in split.items()})
  lora = (lora_lib.LoraConfig(rank=config.train.lora_rank, alpha=config.train.lora_alpha,
                              dropout=0.0) if config.train.base == "lora" else None)
  cfg = train_config(config, lora)

  # 1. The specialists: the assistant (unless given) and, with `base_subjects`, the base.
  spec_lora = lora
  if config.get("specialist_lora_rank") is not None:
    r = config.specialist_lora_rank
    spec_lora = lora_lib.LoraConfig(rank=r, alpha=2.0 * r, dropout=0.0) if r else None

  def specialist(role: str) -> Any:
    key = hashlib.sha256(json.dumps(
        [config.base, config.task, config.instruction, config.dtype, config.seed,
         config.assistant_steps, config.assistant_learning_rate,
         dataclasses.astuple(spec_lora) if spec_lora else None, config.train.batch_size,
         config.target, [e.id for e in split[role]]]
    ).encode()).hexdigest()[:16]
    return pools.finetuned(
        base, lambda: (split[role], prompter), workdir / f"{role}-{key}",
        steps=config.assistant_steps, batch_size=config.train.batch_size, seed=config.seed,
        optim=dataclasses.replace(cfg.optim, learning_rate=config.assistant_learning_rate),
        lora=spec_lora, dtype=dtype, desc=f"{role} (specialist SFT)", answer=target)

  asst_params = (loading.load(config.assistant, dtype, tokenizer=False).params
                 if config.assistant else specialist("assistant"))
  if split.get("base"):
    base = dataclasses.replace(base, params=specialist("base"))
  stage("specialists")

  # 2-3. Scoring passes, gate init, Co-LLM (from the fitted gate) and weak supervision (from the
  # mean row, labels fixed from the original base).
  data = co_llm.make_data(tokens, mask, loss_mask, asst_params, base.config, base.params)
  w0, init_stats = co_llm.init_gate(base.params, data, base.config, cfg, progress=True)
  stage("gate_init")
  trained = co_llm.train(base.params, data, base.config, cfg, w_init=w0)
  weak = co_llm.train(base.params, data, base.config, cfg, objective="weak")
  stage("training")

  # 4. Calibration on validation rows.
  env = core.Env(config=base.config, max_new_tokens=config.max_new_tokens,
                 stop_ids=decoding.stop_ids_for(base.config, tok),
                 pad_id=pipeline.pad_id_of(tok))

  def batches(rows):
    return [(collab.batch_from(b), [rows[i] for i in b["index"] if i >= 0]) for b in
            pipeline.generation_batches(rows, prompter, batch_size=config.batch_size)]

  def accuracy(outs, rows_per_batch):
    # The loop's scoring (evaluate): the same answer extraction, so scores compare.
    scores = [evaluate.score_generated(ex, text, task.spec.metric)["score"]
              for out, rows in zip(outs, rows_per_batch)
              for ex, text in zip(rows, _texts(tok, out))]
    return float(np.mean(scores)), scores

  val = batches(val_rows)
  results = {}
  for name, res in (("co_llm", trained), ("weak_supervision", weak)):
    pair = pool_lib.stack([res.params, asst_params])
    eta, table = co_llm.calibrate(pair, [b for b, _ in val], res.w_defer,
                                  lambda outs: accuracy(outs, [r for _, r in val])[1], env=env,
                                  seed=config.seed)
    results[name] = {"pair": pair, "w": res.w_defer, "eta": eta, "calibration": table}
    logging.info("%s calibration: %s", name, [(r["rate"], round(r["score"], 3)) for r in table])
  co_llm.save(workdir / "checkpoint", results["co_llm"]["pair"], results["co_llm"]["w"],
              results["co_llm"]["eta"])
  stage("calibration")
  rate = next(r["deferral"] for r in results["co_llm"]["calibration"]
              if r["eta"] == results["co_llm"]["eta"])

  # 5. Test.
  test_batches = batches(test)
  rows = [r for _, r in test_batches]
  pair0 = pool_lib.stack([base.params, asst_params])

  def alone(params, deferred: bool):
    # One model decoding by itself (the pair with eta 1 or 0 gives the same tokens at twice the
    # cost: both models run every step).
    def fn(b):
      out = decoding.decode(params, b.prompt, b.prompt_mask, jax.random.key(0),
                            sampler=env.sampler, **env.decode_kw)
      live = jnp.arange(out.tokens.shape[1])[None] < out.lengths[:, None]
      return core.Output(out.tokens, out.lengths, None, {"deferred": live & deferred})
    return fn

  def deferring(name):
    r = results[name]
    return lambda b: co_llm.decode(r["pair"], b, r["w"], eta=r["eta"], env=env)

  systems = {
      "base": alone(base.params, False),
      "assistant": alone(asst_params, True),
      "random_deferral": lambda b: co_llm.decode_random(pair0, b, jax.random.key(config.seed),
                                                        rate=rate, env=env),
      # The base as Co-LLM trained it, never deferring: what deferral adds beyond the training.
      "trained_base": alone(trained.params, False),
      "weak_supervision": deferring("weak_supervision"),
      "co_llm": deferring("co_llm"),
  }
  # The same decoding under two names is run once (train.base='gate': the base is not trained).
  same = {"trained_base": "base"} if trained.params is base.params else {}
  # Every system on the validation rows too: what a choice of setting may look at (test is not).
  # The calibration decoded the trained gates' systems there already (trained_base: its rate 0).
  validation = {name: next(r["score"] for r in results[name]["calibration"]
                           if r["eta"] == results[name]["eta"])
                for name in ("weak_supervision", "co_llm")}
  validation["trained_base"] = results["co_llm"]["calibration"][0]["score"]
  for name in ("base", "assistant", "random_deferral"):
    validation[name] = accuracy([systems[name](b) for b, _ in val], [r for _, r in val])[0]
  validation = {name: validation[name] for name in systems}
  logging.info("validation scores: %s", validation)
  stage("validation")
  out = {"task": task.name, "config": json.loads(config.to_json_best_effort()),
         "rows": {k: len(v) for k, v in split.items()},
         "composition": {k: common.composition(v) for k, v in split.items()},
         "same_question_text": same_text, "validation": validation,
         "init": init_stats, "calibration": {k: v["calibration"] for k, v in results.items()},
         "eta": {k: v["eta"] for k, v in results.items()},
         "train_history": {"co_llm": trained.history, "weak_supervision": weak.history}}
  if not config.get("evaluate_test", True):  # Choosing a setting: validation rows only.
    return _write(out | {"seconds": time.perf_counter() - start, "stages": stages}, workdir)
  summary, lines, per_row = {}, [], {}
  decoded: dict[str, list[core.Output]] = {}
  for name, fn in systems.items():
    outs = decoded[name] = (decoded[same[name]] if name in same
                            else [fn(b) for b, _ in test_batches])
    mean, scores = accuracy(outs, rows)
    lo, hi = evaluate.bootstrap_ci(scores, seed=config.seed)
    # Per family: the scores and [tokens the assistant wrote, tokens generated] (where it defers).
    families: dict[str, list[float]] = {}
    tokens: dict[str, np.ndarray] = {}
    live = [co_llm.live_tokens(b, o)[:len(r)] for o, (b, r) in zip(outs, test_batches)]
    lengths = np.concatenate([m.sum(-1) for m in live])
    deferred = np.concatenate([(np.asarray(o.extras["deferred"])[:len(m)] & m).sum(-1)
                               for o, m in zip(outs, live)])
    for e, sc, n, d in zip((e for r in rows for e in r), scores, lengths, deferred):
      families.setdefault(e.subject, []).append(sc)
      tokens[e.subject] = tokens.get(e.subject, np.zeros(2, np.int64)) + (d, n)
    summary[name] = {"score": mean, "ci95": [lo, hi], "n": len(scores),
                     "deferral": float(deferred.sum() / max(lengths.sum(), 1)),
                     "per_task": {k: float(np.mean(v)) for k, v in families.items()},
                     "per_task_deferral": {k: float(d / max(n, 1)) for k, (d, n) in tokens.items()}}
    per_row[name] = scores
    lines.append(f"{name:18s} {mean:6.3f} [{lo:.3f}, {hi:.3f}]  "
                 f"deferral {summary[name]['deferral']:6.1%}")
    if name == "co_llm":
      traces = []
      for o, (_, r) in zip(outs, test_batches):
        traces += co_llm.deferral_traces(tok, o, [e.id for e in r])
      co_llm.write_traces(traces, workdir)
  stage("test")
  paired = {}
  for other in ("base", "assistant", "trained_base", "random_deferral", "weak_supervision"):
    d = np.asarray(per_row["co_llm"]) - np.asarray(per_row[other])
    lo, hi = evaluate.paired_bootstrap_ci(per_row["co_llm"], per_row[other], seed=config.seed)
    paired[f"co_llm_vs_{other}"] = {"delta": float(d.mean()), "ci95": [lo, hi]}
    lines.append(f"co_llm - {other:16s} {d.mean():+6.3f} [{lo:+.3f}, {hi:+.3f}] (paired)")
  table = (f"{task.name} test ({len(test)} rows), eta {results['co_llm']['eta']:.6g} "
           f"(calibrated deferral {rate:.0%}):\n" + "\n".join(lines))
  table += "\nvalidation rows: " + ", ".join(f"{k} {v:.3f}" for k, v in validation.items())
  base_rates = evaluate.baselines(test, split["train"], "train")
  table += "".join(f"\ntest rows without reading the questions: {line}"
                   for line in evaluate.baseline_lines(base_rates))
  print(table)
  (workdir / "table.txt").write_text(table + "\n")
  return _write(out | {"baselines": base_rates, "summary": summary, "paired": paired,
                       "seconds": time.perf_counter() - start, "stages": stages}, workdir)


def _write(out: dict[str, Any], workdir: pathlib.Path) -> dict[str, Any]:
  """results.json and calibration.png."""
  (workdir / "results.json").write_text(json.dumps(out, indent=1))
  plot_calibration(out["calibration"], workdir / "calibration.png")
  return out


def plot_calibration(calibration: dict[str, list[dict[str, float]]], path: pathlib.Path) -> None:
  """Validation score against the measured deferral rate, one line per trained gate, with 95%
  bootstrap CIs over the validation rows where the table has them."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5, 3.5))
  ax = fig.subplots()
  for name, table in calibration.items():
    x, y = [r["deferral"] for r in table], [r["score"] for r in table]
    if all("ci95" in r for r in table):  # 95% bootstrap CIs over the validation rows.
      err = [[s - r["ci95"][0] for s, r in zip(y, table)],
             [r["ci95"][1] - s for s, r in zip(y, table)]]
      ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=name)
    else:
      ax.plot(x, y, "o-", label=name)
  ax.set_xlabel("deferral rate (share of tokens from the assistant)")
  ax.set_ylabel("validation score")
  ax.set_ylim(-0.02, 1.02)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
