"""Evaluate one model, or every model of a stacked pool at once, on a task split.

    result = evaluate.evaluate_task(pool, task, split="test", method="loglik", output_dir="out")
    result.summary["models"]["smollm2"]["accuracy"]   # {"mean", "ci95": [lo, hi], "n"}

Methods: "generate" (greedy answers; MC rows scored by answer extraction, generative rows by the
task's metric: exact match or GSM8K-style numbers; token F1 is recorded too) and "loglik"
(multiple choice by the summed log-probability of each option as the reply: "accuracy" takes the
raw argmax, "accuracy_norm" divides by the option's length in characters, as lm-eval-harness's
acc_norm does). Every model of the pool is scored in the same jitted program (vmapped).

Outputs: one record per (model, example): {model, id, subject, input, output, prediction,
target, score, ...} as records.jsonl, and summary.json with each metric's mean and bootstrap 95%
confidence interval (percentile, 1000 resamples, seeded). Rows the data marks bad are excluded
from the denominator; the summary lists each by id with its problem and says so.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath

from single_multi import collab, decoding, eval_memo, multihost, pool as pool_lib
from single_multi import reward as reward_lib
from single_multi.data import common, metrics, moco, pipeline
from single_multi.data.tasks import Task
from single_multi.models import transformer
from single_multi.models.config import ModelConfig
from single_multi.models.loading import Model

METHODS = ("generate", "loglik")


@dataclasses.dataclass
class EvalResult:
  records: list[dict[str, Any]]
  summary: dict[str, Any]

  def table(self) -> str:
    return format_summary(self.summary)


# -------------------------------------------------------------------------------------------------
# Scoring kernels (jitted, vmapped over the pool axis).


def _gather_cache(cache, rows_r):
  return {"k": jnp.take(cache["k"], rows_r, axis=1), "v": jnp.take(cache["v"], rows_r, axis=1),
          "pos": jnp.take(cache["pos"], rows_r, axis=0), "end": cache["end"]}


@functools.partial(jax.jit, static_argnames=("config", "share_prefix"))
def choice_logprobs(params_n, tokens_bt, mask_bt, choices_rl, choice_mask_rl, owner_r, *,
                    config: ModelConfig, share_prefix: bool = True, lora=None) -> jax.Array:
  """Summed log p(option tokens | prompt of batch row owner_r[r]) [N, R] for every pool model.

  share_prefix: run each prompt once and every option row from a copy of its prompt's KV cache
  (the option tokens are the only extra work); False scores full (prompt + option) rows, the way
  a plain forward-per-row implementation does: the same numbers, a prompt's compute per option.
  """
  B, P = tokens_bt.shape
  L = choices_rl.shape[1]

  def one(params, lora):
    if share_prefix:
      cache = transformer.init_cache(config, B, P + L, params["embed"].dtype)
      hidden, cache = transformer.hidden_states(params, tokens_bt, config, mask_bt=mask_bt,
                                                cache=cache, lora=lora)
      first = transformer.lm_head(params, hidden[:, -1:], config)  # [B, 1, V]
      hidden, _ = transformer.hidden_states(params, choices_rl, config, mask_bt=choice_mask_rl,
                                            cache=_gather_cache(cache, owner_r), lora=lora)
      rest = transformer.lm_head(params, hidden[:, :-1], config)  # [R, L-1, V]
      logits = jnp.concatenate([jnp.take(first, owner_r, axis=0), rest], axis=1)
    else:
      rows = jnp.concatenate([jnp.take(tokens_bt, owner_r, axis=0), choices_rl], axis=1)
      row_mask = jnp.concatenate([jnp.take(mask_bt, owner_r, axis=0), choice_mask_rl], axis=1)
      hidden, _ = transformer.hidden_states(params, rows, config, mask_bt=row_mask, lora=lora)
      logits = transformer.lm_head(params, hidden[:, P - 1:P + L - 1], config)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(logp, choices_rl[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(choice_mask_rl > 0, token_lp, 0.0), axis=-1)

  return jax.vmap(one)(params_n, lora)


# -------------------------------------------------------------------------------------------------
# Aggregates.


def bootstrap_ci(scores: Sequence[float], samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap confidence interval of the mean."""
  x = np.asarray(scores, np.float64)
  if x.size == 0:
    return (float("nan"), float("nan"))
  idx = np.random.default_rng(seed).integers(0, x.size, size=(samples, x.size))
  means = x[idx].mean(axis=1)
  tail = (1.0 - level) / 2 * 100
  return (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], samples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of mean(a - b) over the same rows, resampled together."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired scores need the same rows: {a.shape} vs {b.shape}")
  return bootstrap_ci(a - b, samples=samples, seed=seed, level=level)


def aggregate(records: Sequence[dict[str, Any]], metric_keys: Sequence[str], seed: int = 0
              ) -> dict[str, Any]:
  """{model: {metric: {mean, ci95, n}, "by_subject": {subject: mean of the first metric}}}."""
  out: dict[str, Any] = {}
  for model in dict.fromkeys(r["model"] for r in records):
    rows = [r for r in records if r["model"] == model]
    entry = {}
    for key in metric_keys:
      values = [r[key] for r in rows if r.get(key) is not None]
      entry[key] = {"mean": float(np.mean(values)) if values else float("nan"),
                    "ci95": list(bootstrap_ci(values, seed=seed)), "n": len(values)}
    subjects: dict[str, list[float]] = {}
    for r in rows:
      subjects.setdefault(r["subject"], []).append(r[metric_keys[0]])
    entry["by_subject"] = {s: float(np.mean(v)) for s, v in sorted(subjects.items())}
    out[model] = entry
  return out


def _baseline_entry(rows: Sequence[common.Example], reference: Sequence[common.Example]
                    ) -> dict[str, Any]:
  mc = [e for e in rows if e.is_mc]
  if not mc:
    return {}
  ref = [e for e in reference if e.is_mc and not e.problem] or mc
  letter = int(np.argmax(np.bincount([e.answer for e in ref])))
  gold = np.bincount([e.answer for e in mc])
  return {"mc_rows": len(mc),
          "chance": float(np.mean([len(e.correct) / len(e.choices) for e in mc])),
          "majority_class": {"letter": metrics.LETTERS[int(np.argmax(gold))],
                             "rate": float(gold.max() / len(mc))},
          "position": {"letter": metrics.LETTERS[letter],
                       "accuracy": float(np.mean([letter in e.correct for e in mc]))}}


def _generation_entry(rows: Sequence[common.Example]) -> dict[str, Any]:
  """Generated-answer rows: chance 0 (no options to hit), and the majority answer (the most
  common normalised first gold answer) with its rate: the exact-match score of always giving it."""
  gen = [e for e in rows if not e.is_mc and e.targets]
  if not gen:
    return {}
  firsts = [metrics.normalize_answer(e.targets[0]) for e in gen]
  answer = max(sorted(set(firsts)), key=firsts.count)
  return {"rows": len(gen), "chance": 0.0, "majority_answer": {
      "answer": answer, "rate": float(np.mean([metrics.exact_match(answer, e.targets)
                                               for e in gen]))}}


def _entry(rows, reference) -> dict[str, Any]:
  gen = _generation_entry(rows)
  return _baseline_entry(rows, reference) | ({"generation": gen} if gen else {})


def baselines(examples: Sequence[common.Example], reference: Sequence[common.Example],
              reference_split: str) -> dict[str, Any]:
  """What answering without reading the question scores. Valid multiple-choice rows: chance (the
  mean share of correct options), the majority class (the most common gold letter of these rows,
  and its rate) and the position baseline (always the most common gold letter of `reference`,
  the dev split, scored on these rows). Generated-answer rows ("generation"): chance 0 and the
  majority answer's rate. Over all rows and per subject."""
  valid = [e for e in examples if not e.problem]
  out = _entry(valid, reference)
  if not out:
    return {}
  subjects = dict.fromkeys(e.subject for e in valid)
  by_subject = {s: _entry([e for e in valid if e.subject == s],
                          [e for e in reference if e.subject == s]) for s in subjects}
  return out | ({"position_from": reference_split} if "mc_rows" in out else {}) | {
      "by_subject": {s: v for s, v in by_subject.items() if v}}


def answer_positions(records: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Share of each letter among a model's multiple-choice predictions ("none": no option)."""
  letters = [r["prediction"] or "none" for r in records if "choices" in r]
  return {k: letters.count(k) / len(letters) for k in sorted(set(letters))} if letters else {}


def baseline_lines(base: dict[str, Any]) -> list[str]:
  """`baselines(...)` as text: the generated-answer line and the multiple-choice line."""
  lines = []
  if gen := base.get("generation"):
    lines.append(f"baselines ({gen['rows']} generated-answer rows): chance 0, majority answer "
                 f"{gen['majority_answer']['rate']:.3f} ({gen['majority_answer']['answer']!r})")
  if "mc_rows" in base:
    lines.append(f"baselines ({base['mc_rows']} MC rows): chance {base['chance']:.3f}, "
                 f"majority class {base['majority_class']['rate']:.3f} "
                 f"({base['majority_class']['letter']}), position "
                 f"{base['position']['accuracy']:.3f} (always {base['position']['letter']}, "
                 f"the most common on {base['position_from']})")
  return lines


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"{summary['task']} [{summary['split']}] method={summary['method']}: "
           f"{summary['n_scored']} scored, {summary['n_excluded']} excluded"]
  for model, entry in summary["models"].items():
    cells = [f"{k} {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
             for k, v in entry.items() if isinstance(v, dict) and "mean" in v]
    lines.append(f"  {model}: " + "  ".join(cells))
  base = summary.get("baselines") or {}
  lines += ["  " + line for line in baseline_lines(base)]
  if "mc_rows" in base:
    for model, entry in summary["models"].items():
      if entry.get("answer_positions"):
        lines.append(f"  {model} answers: " + " ".join(
            f"{k} {v:.0%}" for k, v in entry["answer_positions"].items()))
  if summary["n_excluded"]:
    lines.append(f"  {summary['excluded_note']}")
    lines += [f"    {e['id']}: {e['problem']}" for e in summary["excluded"][:20]]
    if summary["n_excluded"] > 20:
      lines.append(f"    ... and {summary['n_excluded'] - 20} more (summary.json lists all)")
  return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# The runner.


def _as_pool(model: pool_lib.Pool | Model) -> pool_lib.Pool:
  if isinstance(model, pool_lib.Pool):
    return model
  return pool_lib.from_models([model], [model.source])


def asked(ex: common.Example) -> dict[str, Any]:
  """What a record shows of its example: the question and, for multiple choice, the options in
  the order they were shown (and their source positions where the loader reordered them)."""
  fields = {"id": ex.id, "subject": ex.subject, "input": ex.question}
  if ex.is_mc:
    fields["choices"] = list(ex.choices)
    if ex.option_order:
      fields["option_order"] = list(ex.option_order)
  return fields


def check_reward_model(examples, metric: str, reward_model) -> None:
  """Refuses, before any decoding, rows that need a reward model when none is given."""
  needs = sorted({e.subject for e in examples if e.subject in moco.REWARD_TASKS}
                 if metric == "moco" else ())
  if needs and reward_model is None:
    raise common.DataError(f"{needs} are scored by a reward model (the reference's "
                           f"{reward_lib.DEFAULT}); pass reward_model= (evaluate) or set "
                           "config.reward_model (the loop), or choose other tasks")


def _reward_scores(records: list[dict[str, Any]], examples, reward_model, batch_size: int
                   ) -> None:
  """Fills the score of every reward-model record: the reward of (question, reply)."""
  pending = [r for r in records if r["score"] is None and r["subject"] in moco.REWARD_TASKS]
  if not pending:
    return
  question = {ex.id: ex.question for ex in examples}
  values = reward_lib.scores(reward_model, [question[r["id"]] for r in pending],
                             [r["output"] for r in pending], batch_size=batch_size)
  for r, v in zip(pending, values):
    r["score"] = float(v)


def _score_moco(ex: common.Example, text: str) -> dict[str, Any]:
  """The MoCo toolkit's scoring of one reply (data/moco.py; the rules in metrics.py)."""
  if ex.is_mc:
    pred = metrics.moco_choice(text, ex.choices)
    return {"prediction": None if pred is None else metrics.LETTERS[pred],
            "target": metrics.LETTERS[ex.answer], "score": float(pred in ex.correct)}
  if ex.subject in moco.REWARD_TASKS:  # The reply as written; `finish` asks the reward model.
    return {"prediction": text, "target": None, "score": None}
  answer = metrics.moco_answer(text)
  f1 = metrics.token_f1(answer, ex.targets)
  exact = metrics.exact_match(answer, ex.targets)
  return {"prediction": answer, "target": list(ex.targets),
          "score": f1 if ex.subject in moco.F1_TASKS else exact, "f1": f1, "exact": exact}


def score_generated(ex: common.Example, text: str, metric: str) -> dict[str, Any]:
  if metric == "moco":  # The reference's rules for every row type, its MC parse included.
    return _score_moco(ex, text)
  if ex.is_mc:
    pred = metrics.extract_choice(text, ex.choices)
    return {"prediction": None if pred is None else metrics.LETTERS[pred],
            "target": metrics.LETTERS[ex.answer], "score": float(pred in ex.correct)}
  if metric == "numeric":
    number = metrics.extract_number(text)
    return {"prediction": number, "target": ex.targets[0],
            "score": metrics.numeric_match(text, ex.targets[0])}
  return {"prediction": text.strip(), "target": list(ex.targets),
          "score": metrics.exact_match(text, ex.targets), "f1": metrics.token_f1(text, ex.targets)}


def check_context(config: ModelConfig, batch, examples, max_new_tokens: int) -> None:
  """Refuses a batch whose longest prompt plus the answer budget exceeds the model's context."""
  context = config.max_position_embeddings
  lengths = np.asarray(batch["mask"]).sum(axis=1)
  if context and lengths.max() + max_new_tokens > context:
    b = int(np.argmax(lengths))
    raise common.DataError(
        f"the prompt of {examples[int(batch['index'][b])].id} has {int(lengths[b])} tokens; "
        f"with max_new_tokens={max_new_tokens} it exceeds the model's context of {context} "
        "tokens: lower max_new_tokens or k_shot, or shorten the prompt")


def example_number(ex: common.Example | None) -> int:
  """A stable 31-bit number of an example id (0 for a padding row)."""
  return 0 if ex is None else zlib.crc32(ex.id.encode()) & 0x7FFFFFFF


def scores_matrix(result: EvalResult, names: Sequence[str], examples) -> np.ndarray:
  """[N, Q] per-model scores of an evaluation, in the order of `examples`."""
  by = {(r["model"], r["id"]): r["score"] for r in result.records}
  return np.asarray([[by[(n, ex.id)] for ex in examples] for n in names], np.float32)


def example_keys(key: jax.Array, examples: Sequence[common.Example | None]) -> jax.Array:
  """[B] per-row sampling keys: fold_in(key, example_number(example))."""
  return decoding.row_keys(key, [example_number(e) for e in examples])


def answer_key(ex: common.Example, text: str, metric: str):
  """The answer a vote counts for one reply, as the task's scoring extracts it: the option
  letter, the number, the extracted (MoCo) answer, else the normalised text; None: nothing."""
  if metric == "moco" and not ex.is_mc and ex.subject in moco.REWARD_TASKS:
    return text.strip()  # Scored by a reward model: nothing to extract.
  pred = score_generated(ex, text, metric)["prediction"]
  if isinstance(pred, str) and not ex.is_mc and metric != "moco":
    return metrics.normalize_answer(pred)
  return pred


def selected(spec, out, examples, rows: Sequence[int], tokenizer, metric: str, cfg, state):
  """A strategy's host step (`Strategy.select`, e.g. the vote on extracted answers): each
  row's chosen agent among out.extras["final"]. Returns tokens, lengths [1, B, M], [1, B]."""
  tokens, lengths = (np.asarray(x) for x in out.extras["final"])  # [N, B, M], [N, B]
  keys = [[answer_key(examples[i], tokenizer.decode(tokens[n, b, :lengths[n, b]],
                                                    skip_special_tokens=True), metric)
           for n in range(tokens.shape[0])] for b, i in enumerate(rows)]
  chosen = np.zeros(tokens.shape[1], np.int64)  # Padding rows of the batch: agent 0's.
  chosen[:len(rows)] = spec.select(keys, cfg, state)
  b = np.arange(tokens.shape[1])
  return tokens[chosen, b][None], lengths[chosen, b][None]


def evaluate(model: pool_lib.Pool | Model, examples: Sequence[common.Example], *,
             prompter: pipeline.Prompter, task_name: str = "task", split: str = "test",
             method: str = "generate", metric: str = "exact_match", batch_size: int = 8,
             max_new_tokens: int = 64, output_dir: str | os.PathLike | None = None,
             progress: bool = True, seed: int = 0, share_prefix: bool = True,
             strategy: str | None = None, strategy_cfg: Any = None,
             strategy_state: Any = None, reference: Sequence[common.Example] | None = None,
             reference_split: str = "dev", reward_model: Model | None = None,
             sampler: Any = decoding.Greedy(), key: jax.Array | None = None,
             members: EvalResult | None = None,
             memo: str | os.PathLike | None = None) -> EvalResult:
  """Scores every valid example with every model; see the module docstring.

  strategy: score the pool's collaboration instead (a `collab` registry name; method "generate"):
  one record per example under the model name `strategy`, the strategy's config and fitted state
  as given. reference: the rows (of `reference_split`) whose most common gold letter is the
  position baseline; None: `examples` themselves. reward_model: scores rows of reward-model tasks
  (`reward.load()`), needed only when there are such rows. sampler: how every answer is decoded
  (temperature 0: `decoding.Greedy()`); each row samples with `example_keys(key, its example)`
  (key default: `jax.random.key(seed)`), so its answer does not depend on the batching.
  members: the pool's own results on these examples (`evaluate` without a strategy, generated):
  a router registered with `route` then only routes, and each row's record is its chosen
  member's record (answer and score as that member gave them; under sampling, the member's own
  sample), renamed to the strategy and marked `routed_to`. Greedy: what the strategy would
  decode itself, at the cost of the routing alone.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  if strategy is not None and method != "generate":
    raise ValueError(f"a collaboration ({strategy}) is scored by its generated answers: "
                     "method='generate'")
  check_reward_model(examples, metric, reward_model)
  pool = _as_pool(model)
  own = _member_records(members, examples, strategy, pool.names, method)
  if strategy is not None:
    env = collab.make_env(pool, strategy, strategy_cfg, max_new_tokens=max_new_tokens,
                          sampler=sampler)
    env_cfg = strategy_cfg if strategy_cfg is not None else collab.get(strategy).Config()
  make = pipeline.loglik_batches if method == "loglik" else pipeline.generation_batches
  # The singles' decode prefills the prompts' shared head (the chat template's) once per batch;
  # so does a router's routing (`routers.query_features`).
  head = ({"split_prefix": True} if method == "generate" and (strategy is None or own is not None)
          else {})
  batches = make(examples, prompter, batch_size=batch_size,
                 shard=(jax.process_index(), jax.process_count()), **head)
  stop_ids = decoding.stop_ids_for(pool.config, pool.tokenizer)
  pad_id = pipeline.pad_id_of(pool.tokenizer)
  key = jax.random.key(seed) if key is None else key
  start, waited = time.perf_counter(), 0.0
  finish_kw = dict(method=method, metric=metric, task_name=task_name, split=split, seed=seed,
                   output_dir=output_dir, reference=reference, reference_split=reference_split,
                   reward_model=reward_model, batch_size=batch_size)
  model_order = (strategy,) if strategy is not None else pool.names
  memo_key = None
  if memo is not None:
    memo_key = eval_memo.key(
        params=pool.params, config=pool.config, examples=examples, prompter=prompter,
        method=method, metric=metric, split=split, task_name=task_name, seed=seed,
        max_new_tokens=max_new_tokens, batch_size=batch_size, share_prefix=share_prefix,
        sampler=sampler, rng_key=key, strategy=strategy,
        strategy_cfg=env_cfg if strategy is not None else None, strategy_state=strategy_state,
        members=members if own is not None else None, reward_model=reward_model)
    kept = eval_memo.load(memo, memo_key)
    if kept is not None:
      return finish(kept, examples, model_order, timing={
          "wall_seconds": time.perf_counter() - start, "memo": memo_key}, **finish_kw)
  records: list[dict[str, Any]] = []
  iterator = pipeline.prefetch(batches)
  for _ in tqdm.trange(len(batches), desc=f"{task_name}/{split} {method}", unit="batch",
                       disable=not progress or not multihost.is_primary()):
    t0 = time.perf_counter()
    batch = next(iterator)
    waited += time.perf_counter() - t0
    rows = [int(i) for i in batch["index"] if i >= 0]
    if not rows:
      continue
    if method == "loglik":
      lp = np.asarray(choice_logprobs(pool.params, batch["tokens"], batch["mask"],
                                      batch["choices"], batch["choice_mask"], batch["owner"],
                                      config=pool.config, share_prefix=share_prefix))
      column = {(int(b), int(c)): r for r, (b, c) in enumerate(zip(batch["owner"], batch["slot"]))
                if c >= 0}  # (batch row, option) -> row of the flat option set.
      for n, name in enumerate(pool.names):
        for b, i in enumerate(rows):
          ex = examples[i]
          scores = [lp[n, column[b, c]] for c in range(len(ex.choices))]
          raw, norm = metrics.mc_loglik_predictions(scores, [len(c) for c in ex.choices])
          records.append({"model": name, **asked(ex), "output": [float(s) for s in scores],
                          "prediction": metrics.LETTERS[raw], "prediction_norm":
                          metrics.LETTERS[norm], "target": metrics.LETTERS[ex.answer],
                          "score": float(raw in ex.correct),
                          "score_norm": float(norm in ex.correct)})
    else:
      check_context(pool.config, batch, examples, max_new_tokens)
      keys = example_keys(key, [examples[i] if i >= 0 else None for i in batch["index"]])
      if own is not None:  # Routed to a member: its own answer, nothing decoded.
        choice, _ = collab.route(pool, strategy, collab.batch_from(batch), env=env,
                                 cfg=strategy_cfg, state=strategy_state, rng=keys)
        choice = np.asarray(choice)
        for b, i in enumerate(rows):
          name = pool.names[int(choice[b])]
          records.append({**own[name, examples[i].id], "model": strategy, "routed_to": name})
        continue
      if strategy is not None:
        out = collab.run(pool, strategy, collab.batch_from(batch), env=env, cfg=strategy_cfg,
                         state=strategy_state, rng=keys)
        names = (strategy,)
        tokens, lengths = np.asarray(out.tokens)[None], np.asarray(out.lengths)[None]
        spec = collab.get(strategy)
        if spec.select is not None:
          tokens, lengths = selected(spec, out, examples, rows, pool.tokenizer, metric,
                                     env_cfg, strategy_state)
      else:
        headed = "prefix" in batch
        out = pool_lib.decode_each(pool.params, batch["rest" if headed else "tokens"],
                                   batch["rest_mask" if headed else "mask"], keys,
                                   config=pool.config, sampler=sampler,
                                   max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                   pad_id=pad_id, prefix_p=batch.get("prefix"))
        names = pool.names
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      records += generation_records(examples, rows, names, tokens, lengths, pool.tokenizer,
                                    metric)
  records = multihost.allgather_records(records)  # Each process scored its shard.
  result = finish(records, examples, model_order, timing={
      "wall_seconds": time.perf_counter() - start, "input_pipeline_seconds": waited}, **finish_kw)
  if memo_key is not None:
    eval_memo.save(memo, memo_key, result.records)
  return result


def _member_records(members: EvalResult | None, examples, strategy: str | None,
                    names: Sequence[str], method: str
                    ) -> dict[tuple[str, str], dict[str, Any]] | None:
  """(member, example id) -> that member's record, when a router may take them (see
  `evaluate`'s members); None when the strategy decodes its own answers. Refuses members that
  are not the pool's generated answers to every valid example."""
  if members is None or strategy is None:
    return None
  if collab.get(strategy).route is None:
    return None  # Not a router: the members' answers are not its answers.
  if method != "generate" or list(members.summary["models"]) != list(names):
    raise ValueError(f"members must be the pool's own generated answers (models {list(names)}); "
                     f"got {list(members.summary['models'])}")
  own = {(r["model"], r["id"]): r for r in members.records}
  missing = sorted({e.id for e in examples if not e.problem} - {i for _, i in own})
  if missing:
    raise ValueError(f"members has no answers to {len(missing)} of these examples "
                     f"(e.g. {missing[:3]}): evaluate the pool on the same examples")
  return own


def generation_records(examples, rows: Sequence[int], names: Sequence[str], tokens, lengths,
                       tokenizer, metric: str) -> list[dict[str, Any]]:
  """Scored records of generated answers: tokens/lengths [N, B(, M)] of models `names` for
  batch rows that hold examples[rows[b]]."""
  records = []
  for n, name in enumerate(names):
    for b, i in enumerate(rows):
      ex = examples[i]
      ids = tokens[n, b, :lengths[n, b]]
      text = tokenizer.decode(ids, skip_special_tokens=True)
      # output_ids: the answer exactly as generated (with its stop token), what distillation
      # trains on (`rows.answer_rows`); the text is for scoring and reading.
      records.append({"model": name, **asked(ex), "output": text,
                      "output_ids": [int(t) for t in ids], **score_generated(ex, text, metric)})
  return records


def finish(records: list[dict[str, Any]], examples, model_order: Sequence[str], *, method: str,
           metric: str, task_name: str, split: str, seed: int, output_dir=None,
           timing: dict[str, float] | None = None,
           reference: Sequence[common.Example] | None = None,
           reference_split: str = "dev", reward_model: Model | None = None,
           batch_size: int = 8) -> EvalResult:
  """Sorted records, the summary (bootstrap CIs, excluded rows, baselines, each model's answer
  positions) and the files. reference: the rows whose most common gold letter is the position
  baseline (the dev split); None: the evaluated rows themselves. reward_model: scores the
  reward-model rows."""
  check_reward_model([e for e in examples if not e.problem], metric, reward_model)
  _reward_scores(records, examples, reward_model, batch_size)
  excluded = [{"id": ex.id, "problem": ex.problem} for ex in examples if ex.problem]
  order = {ex.id: i for i, ex in enumerate(examples)}
  records.sort(key=lambda r: (model_order.index(r["model"]), order[r["id"]]))
  keys = ["score", "score_norm"] if method == "loglik" else ["score"]
  if method == "generate" and any("f1" in r for r in records):
    keys.append("f1")
  models = aggregate(records, keys, seed=seed)
  names = {"score": "accuracy" if method == "loglik" else "score", "score_norm": "accuracy_norm",
           "f1": "f1"}
  summary = {
      "task": task_name, "split": split, "method": method, "metric": metric,
      "n_examples": len(examples), "n_scored": len(examples) - len(excluded),
      "n_excluded": len(excluded), "excluded": excluded,
      "excluded_note": (f"{len(excluded)} bad row(s) excluded from the denominator "
                        f"(scored {len(examples) - len(excluded)} of {len(examples)})"),
      "models": {m: {names[k]: v for k, v in e.items() if k in names} | {"by_subject":
                 e["by_subject"]} for m, e in models.items()},
      "baselines": baselines(examples, examples if reference is None else reference,
                             split if reference is None else reference_split),
      **(timing or {}),
  }
  for m, entry in summary["models"].items():
    mine = [r for r in records if r["model"] == m]
    entry["answer_positions"] = answer_positions(mine)
    if entry["answer_positions"]:
      by_subject = {s: answer_positions([r for r in mine if r["subject"] == s])
                    for s in dict.fromkeys(r["subject"] for r in mine)}
      entry["answer_positions_by_subject"] = {s: v for s, v in by_subject.items() if v}
  if output_dir is not None and multihost.is_primary():
    out_dir = epath.Path(output_dir)  # Local or a bucket (gs://...).
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
  return EvalResult(records, summary)


def evaluate_task(model: pool_lib.Pool | Model, task: Task, *, split: str | None = None,
                  limit: int | None = None, prompt: pipeline.PromptConfig | None = None,
                  **kwargs) -> EvalResult:
  """`evaluate` on a named task's split (default: its test split), exemplars from its shot split.

  limit: only the first `limit` examples of the split (in the data's stored order). prompt: None
  is the task's own prompt style, zero-shot.
  """
  prompt = prompt or pipeline.PromptConfig(style=task.spec.prompt)
  split = split or task.spec.test_split
  if split == task.spec.shot_split and prompt.k_shot:
    raise common.DataError(f"{task.name}: k-shot exemplars come from {split!r}, the split being "
                           "evaluated; evaluate another split or set k_shot=0")
  examples = task.examples(split)[:limit]
  shots = task.examples(task.spec.shot_split) if prompt.k_shot else ()
  pool = _as_pool(model)
  prompter = pipeline.Prompter(pool.tokenizer, prompt, shots)
  return evaluate(pool, examples, prompter=prompter, task_name=task.name, split=split,
                  metric=task.spec.metric, reference=task.examples(task.spec.dev_split),
                  reference_split=task.spec.dev_split, **kwargs)
