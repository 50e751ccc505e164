"""The Co-LLM job: specialist assistant, gate init, training, calibration, evaluation, traces.

    python -m single_multi.main --config=configs/co_llm_bigbench.py --workdir=/tmp/co_llm

(`single_multi.main` is its one entry point.) Answers are scored as the loop scores them
(`evaluate.score_generated`).

1. The assistant: the configured model, or the base fine-tuned on the task's training rows (a
   specialist; cached in the workdir, reused when present).
2. The assistant's scoring pass over the training sequences (gold log-probs, argmax-is-gold).
3. Gate init ("method a" by default), then Co-LLM training (marginal likelihood) and the
   weak-supervision baseline, each from the base.
4. Calibration on the validation rows: deferral rates 0%..90%, best eta kept; the same rate is
   used for the random-deferral baseline.
5. Test: base, assistant, random deferral, weak supervision, Co-LLM: accuracy with a bootstrap
   95% CI and deferral frequency; results.json, table.txt, traces.jsonl/html, the checkpoint.
Rows: dev split -> train (first `1 - val_fraction`) and validation; test split -> evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import config_dict

from single_multi import co_llm, collab, decoding, evaluate, pool as pool_lib, train as train_lib
from single_multi.collab import core
from single_multi.data import pipeline, tasks
from single_multi.models import lora as lora_lib, loading


def _texts(tokenizer, out: core.Output) -> list[str]:
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokenizer.decode(tokens[b, :lengths[b]], skip_special_tokens=True)
          for b in range(tokens.shape[0])]


# Field -> (allowed?, what is allowed): checked before anything loads or trains.
RANGES: dict[str, tuple[Any, str]] = {
    "val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "train_examples": (lambda v: v >= 1, "an integer >= 1"),
    "val_examples": (lambda v: v >= 1, "an integer >= 1"),
    "test_examples": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "assistant_steps": (lambda v: v >= 1, "an integer >= 1"),
    "assistant_learning_rate": (lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
    "train.base": (lambda v: v in ("full", "lora", "gate"), "'full', 'lora' or 'gate'"),
    "train.init": (lambda v: v in ("a", "b", "none"), "'a', 'b' or 'none'"),
    "train.steps": (lambda v: v >= 1, "an integer >= 1"),
    "train.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "train.lora_rank": (lambda v: v >= 1, "an integer >= 1"),
    "train.learning_rate": (lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
    "train.gate_learning_rate": (lambda v: np.isfinite(v) and v > 0, "a finite number > 0"),
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


def run(config: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  dtype = jnp.dtype(config.dtype)
  base = loading.load(config.base, dtype)
  tok = base.tokenizer
  task = tasks.from_config(config.task, config)
  dev = [e for e in task.dev if not e.problem]
  test = [e for e in task.test if not e.problem][:config.test_examples]
  n_val = max(1, int(round(len(dev) * config.val_fraction)))
  train_rows, val_rows = dev[:len(dev) - n_val][:config.train_examples], dev[len(dev) - n_val:]
  val_rows = val_rows[:config.val_examples]
  prompt = pipeline.PromptConfig(k_shot=0, gen_instruction=config.instruction)
  prompter = pipeline.Prompter(tok, prompt)
  eos = decoding.stop_ids_for(base.config, tok)[0]
  tokens, mask, loss_mask = pipeline.sft_rows(prompter, train_rows,
                                              [pipeline.gold_answer(e) for e in train_rows], eos)
  logging.info("%s: %d train, %d validation, %d test rows", task.name, len(train_rows),
               len(val_rows), len(test))
  train_kw = dict(steps=config.train.steps, batch_size=config.train.batch_size)
  optim = train_lib.OptimConfig(learning_rate=config.train.learning_rate,
                                warmup_fraction=config.train.warmup_fraction)
  lora = (lora_lib.LoraConfig(rank=config.train.lora_rank, alpha=config.train.lora_alpha,
                              dropout=0.0) if config.train.base == "lora" else None)

  # 1. The assistant.
  specialist = workdir / "assistant"
  if config.assistant:
    asst_params = loading.load(config.assistant, dtype, tokenizer=False).params
  elif (specialist / "config.json").exists():
    asst_params = loading.load(str(specialist), dtype, tokenizer=False).params
    logging.info("reusing the specialist assistant in %s", specialist)
  else:
    asst_params, _ = train_lib.finetune(
        base.params, tokens, mask, loss_mask, base.config, lora=lora, seed=config.seed,
        optim=dataclasses.replace(optim, learning_rate=config.assistant_learning_rate),
        steps=config.assistant_steps, batch_size=config.train.batch_size,
        desc="assistant (specialist SFT)")
    loading.save_hf(specialist, base.config, asst_params)

  # 2-3. Scoring pass, gate init, Co-LLM and weak supervision.
  data = co_llm.make_data(tokens, mask, loss_mask, asst_params, base.config)
  cfg = co_llm.CoLlmTrainConfig(train_base=config.train.base, lora=lora or lora_lib.LoraConfig(),
                                optim=optim, gate_learning_rate=config.train.gate_learning_rate,
                                init=config.train.init, seed=config.seed, **train_kw)
  w0, init_stats = co_llm.init_gate(base.params, data, base.config, cfg)
  trained = co_llm.train(base.params, data, base.config, cfg, w_init=w0)
  weak = co_llm.train(base.params, data, base.config, cfg, w_init=w0, objective="weak")

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
                                  lambda outs: accuracy(outs, [r for _, r in val])[0], env=env)
    results[name] = {"pair": pair, "w": res.w_defer, "eta": eta, "calibration": table}
    logging.info("%s calibration: %s", name, [(r["rate"], round(r["score"], 3)) for r in table])
  co_llm.save(workdir / "checkpoint", results["co_llm"]["pair"], results["co_llm"]["w"],
              results["co_llm"]["eta"])
  rate = next(r["deferral"] for r in results["co_llm"]["calibration"]
              if r["eta"] == results["co_llm"]["eta"])

  # 5. Test.
  test_batches = batches(test)
  rows = [r for _, r in test_batches]
  pair0 = pool_lib.stack([base.params, asst_params])
  systems = {
      "base": lambda b: co_llm.decode(pair0, b, jnp.zeros_like(w0), eta=1.0, env=env),
      "assistant": lambda b: co_llm.decode(pair0, b, jnp.zeros_like(w0), eta=0.0, env=env),
      "random_deferral": lambda b: co_llm.decode_random(pair0, b, jax.random.key(config.seed),
                                                        rate=rate, env=env),
      "weak_supervision": lambda b: co_llm.decode(results["weak_supervision"]["pair"], b,
                                                  results["weak_supervision"]["w"],
                                                  eta=results["weak_supervision"]["eta"],
                                                  env=env),
      "co_llm": lambda b: co_llm.decode(results["co_llm"]["pair"], b, results["co_llm"]["w"],
                                        eta=results["co_llm"]["eta"], env=env),
  }
  summary, lines = {}, []
  for name, fn in systems.items():
    outs = [fn(b) for b, _ in test_batches]
    mean, scores = accuracy(outs, rows)
    lo, hi = evaluate.bootstrap_ci(scores, seed=config.seed)
    live = sum(int(np.asarray(o.lengths).sum()) for o in outs)
    deferral = sum(int(np.asarray(o.extras["deferred"]).sum()) for o in outs) / max(live, 1)
    summary[name] = {"accuracy": mean, "ci95": [lo, hi], "deferral": deferral, "n": len(scores)}
    lines.append(f"{name:18s} {mean:6.3f} [{lo:.3f}, {hi:.3f}]  deferral {deferral:6.1%}")
    if name == "co_llm":
      traces = []
      for out, (_, r) in zip(outs, test_batches):
        traces += co_llm.deferral_traces(tok, out, [e.id for e in r])
      co_llm.write_traces(traces, workdir)
  table = (f"{task.name} test ({len(test)} rows), eta {results['co_llm']['eta']:.6g} "
           f"(calibrated deferral {rate:.0%}):\n" + "\n".join(lines))
  print(table)
  (workdir / "table.txt").write_text(table + "\n")
  out = {"task": task.name, "summary": summary, "init": init_stats,
         "calibration": {k: v["calibration"] for k, v in results.items()},
         "eta": {k: v["eta"] for k, v in results.items()},
         "train_history": {"co_llm": trained.history, "weak_supervision": weak.history}}
  (workdir / "results.json").write_text(json.dumps(out, indent=1))
  return out
