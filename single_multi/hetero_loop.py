"""The loop on a heterogeneous pool (`config.pool_kind="heterogeneous"`, a `pool.Groups`).

Members of different architectures or tokenizers are grouped: each group is a stacked pool that
decodes its members' answers and distils them as one vmapped program, with its own tokenizer and
prompter. What crosses a group boundary is text:

  singles        each group's members answer with `evaluate.evaluate` (its own chat template);
                 the records are merged and scored together (`evaluate.finish`)
  collaboration  `collab.run_heterogeneous` (text- and API-level strategies on host text), scored
                 as text by the same rules as every answer (`evaluate.score_generated`)
  fit            the strategies whose fit reads only the singles' dev scores (`_best_on_dev`)
  rows           supervised_kd: the collaboration's dev answers re-tokenised per group with that
                 group's prompter and eos (`pipeline.sft_rows`; the answers come from another
                 tokenizer, so token-space rows as in the stacked loop do not exist);
                 multi_student_kd: those rows, then half the dev rows with the model's own
                 previous answer and half with the best student's, as text
  distill        each group trains on its rows with `distill.train_pool`
  checkpoints    params {"group<g>": stacked params}; arrays "group<g>__<name>"

`spec.validate` refuses, before anything loads, what a heterogeneous pool cannot do: logit-,
token- and weight-level strategies (one vocabulary and one architecture), the routers (their fit
reads one member's hidden states of the dev prompts), logit_kd / on_policy_kd (per-token teacher
rows in one vocabulary) and `fused_round` (one program over one stacked pool).
Every process runs the whole text exchange (it is not sharded over processes).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np

from single_multi import collab, decoding, distill, evaluate, pool as pool_lib
from single_multi import rows as rows_lib
from single_multi.data import pipeline

STRATEGIES = ("single", "multiagent_refine", "mixture_of_agents", "llm_blender",
              "multiagent_finetuning")
METHODS = ("supervised_kd", "multi_student_kd")
SEP = "__"  # Array names in a checkpoint: group<g>__tokens.


def _finish(loop, records, examples, names, split, out_dir, start) -> evaluate.EvalResult:
  return evaluate.finish(records, examples, names, method="generate",
                         metric=loop.task.spec.metric, task_name=loop.task.name, split=split,
                         seed=loop.config.seed, output_dir=out_dir,
                         timing={"wall_seconds": time.perf_counter() - start},
                         reference=loop.dev, reward_model=loop.reward_model,
                         batch_size=loop.config.batch_size)


def singles(loop, groups: pool_lib.Groups, examples, split: str,
            out_dir=None) -> evaluate.EvalResult:
  """Every member's answers, each group decoding its own (with its prompter), scored together
  (reward-model rows are scored once, inside each group's `evaluate`)."""
  start, records = time.perf_counter(), []
  for p, prompter in zip(groups.pools, loop.prompters):
    records += evaluate.evaluate(p, examples, split=split, method="generate",
                                 key=loop.key(f"{split}_singles"),
                                 **(loop.kw | {"prompter": prompter})).records
  return _finish(loop, records, examples, groups.names, split, out_dir, start)


def text_seed(loop, purpose: str) -> int:
  """The host text exchange's decode seed, from (seed, round, purpose) like every sampling key."""
  return int(jax.random.randint(loop.key(purpose), (), 0, 2**31 - 1))


def fit(loop, dev_scores: np.ndarray | None):
  """The strategy's dev-fitted state: the heterogeneous loop's strategies learn at most the best
  single member on dev (`text_level._best_on_dev`, from the singles' dev scores)."""
  spec = collab.get(loop.config.strategy)
  if spec.fit is None:
    return None
  return spec.fit(None, collab.DevData(None, dev_scores), loop.spec.scfg, None,
                  jax.random.key(0))


def collaboration(loop, groups: pool_lib.Groups, examples, split: str, state,
                  out_dir=None) -> evaluate.EvalResult:
  """The strategy's answers as host text (`collab.run_heterogeneous`), scored as text."""
  start = time.perf_counter()
  strategy, metric = loop.config.strategy, loop.task.spec.metric
  valid = [e for e in examples if not e.problem]
  outs = collab.run_heterogeneous(
      groups.members(), strategy, valid, cfg=loop.spec.scfg, state=state,
      prompt=loop.prompter.config, shots=loop.prompter.shots,
      max_new_tokens=loop.config.max_new_tokens, sampler=loop.spec.sampler,
      seed=text_seed(loop, f"{split}_collab"), batch_size=loop.config.batch_size,
      answer_key=lambda ex, text: evaluate.answer_key(ex, text, metric), progress=loop.progress)
  records = [{"model": strategy, **evaluate.asked(ex), "output": o["output"],
              "answers": o.get("answers"), **evaluate.score_generated(ex, o["output"], metric)}
             for ex, o in zip(valid, outs)]
  return _finish(loop, records, examples, (strategy,), split, out_dir, start)


# -------------------------------------------------------------------------------------------------
# Training rows per group (text, re-tokenised with each group's tokenizer).


def _stack_left(parts: Sequence[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
  """Left-padded row sets of different widths stacked on a new leading axis (pad: mask 0)."""
  width = max(p[0].shape[1] for p in parts)
  return tuple(np.stack([np.pad(p[k], ((0, 0), (width - p[k].shape[1], 0))) for p in parts])
               for k in range(len(parts[0])))


def group_rows(loop, groups: pool_lib.Groups, answers: dict[str, str],
               own: dict[tuple[str, str], str] | None = None,
               keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Per group: the dev rows with the collaboration's `answers` (by example id); with `own`
  ((member, id) -> the member's own or the best student's answer: multi_student_kd) each member
  adds those rows after them ([n_g, 2R, T]). keep [R]: the rows to train on."""
  dev = [ex for k, ex in enumerate(loop.dev) if keep is None or keep[k]]
  if not dev:
    raise rows_lib.NoTrainingRows("every collaborative dev output was filtered out (the "
                                  "correctness filter kept none)")
  arrays = {}
  for g, (p, prompter) in enumerate(zip(groups.pools, loop.prompters)):
    eos = decoding.stop_ids_for(p.config, p.tokenizer)[0]
    if own is None:
      rows = pipeline.sft_rows(prompter, dev, [answers[ex.id] for ex in dev], eos)
    else:
      rows = _stack_left([pipeline.sft_rows(prompter, dev + dev, [answers[ex.id] for ex in dev]
                                            + [own[(name, ex.id)] for ex in dev], eos)
                          for name in p.names])
    arrays |= {f"group{g}{SEP}{k}": v for k, v in zip(("tokens", "mask", "loss_mask"), rows)}
  return arrays


def collaborate_stage(d, st, r: int):
  """The collaboration on dev -> each group's training rows (supervised_kd, multi_student_kd)."""
  loop, groups = d.loop, st.pool
  dev_singles = scores = None
  if loop.needs_dev_singles():
    dev_singles = singles(loop, groups, loop.dev, "dev")
    scores = evaluate.scores_matrix(dev_singles, groups.names, loop.dev)
  res = collaboration(loop, groups, loop.dev, "dev", fit(loop, scores),
                      d.workdir / f"round_{r}" / "collaboration_dev")
  by_id = {x["id"]: x for x in res.records}
  keep = None
  if loop.spec.dcfg.correctness_filter:
    keep = np.asarray([by_id[ex.id]["score"] > 0 for ex in loop.dev])
  answers = {i: x["output"] for i, x in by_id.items()}
  own = None
  if loop.spec.dcfg.method == "multi_student_kd":
    best = groups.names[int(np.argmax(scores.mean(axis=1)))]
    half = rows_lib.own_half(loop)
    text = {(x["model"], x["id"]): x["output"] for x in dev_singles.records}
    own = {(n, ex.id): text[(n if half[k] else best, ex.id)]
           for n in groups.names for k, ex in enumerate(loop.dev)}
  return dataclasses.replace(
      st, arrays=rows_lib.or_skip(lambda: group_rows(loop, groups, answers, own, keep), r))


def distill_stage(d, st, r: int):
  """Each group trains its members on its rows at once (`distill.train_pool`)."""
  dcfg, groups = d.loop.spec.dcfg, st.pool
  if not st.arrays:  # collaborate_stage found no training rows: nothing changes this round.
    return dataclasses.replace(st, distill_stats={**st.distill_stats, str(r): rows_lib.SKIPPED})
  params, stats = {}, {}
  for g, p in enumerate(groups.pools):
    arrays = {k.split(SEP, 1)[1]: v for k, v in st.arrays.items()
              if k.startswith(f"group{g}{SEP}")}
    params[f"group{g}"], losses = distill.train_pool(
        p.params, arrays, p.config, dcfg, per_model_batch=dcfg.method == "multi_student_kd",
        progress=d.progress, mesh=d.mesh)
    stats[f"group{g}"] = distill.loss_stats(losses, dcfg) | {"models": list(p.names)}
  return dataclasses.replace(st, pool=groups.with_params(params), arrays={},
                             distill_stats={**st.distill_stats, str(r): stats})


def refusal(config) -> str | None:
  """Why a heterogeneous pool cannot run `config` (None: it can); `spec.validate` raises it."""
  if config.get("fused_round"):
    return ("fused_round runs a round as one program over one stacked pool; a heterogeneous "
            "pool exchanges text between its groups: set fused_round=False")
  if config.specialists:
    return ("specialists are fine-tuned from pool[0] into one stacked pool; a heterogeneous "
            "pool loads its members as given: set specialists=()")
  if config.strategy not in STRATEGIES:
    level = collab.get(config.strategy).level
    why = ("its fit reads one member's hidden states of the dev prompts"
           if level == "api" else f"it combines the models' {level}s, which needs one "
           "vocabulary and one architecture")
    return (f"strategy={config.strategy!r} cannot run on a heterogeneous pool: {why}; use one "
            f"of {list(STRATEGIES)}")
  if config.distill.method not in METHODS:
    return (f"distill.method={config.distill.method!r} trains on per-token teacher rows in one "
            f"vocabulary; a heterogeneous pool's members learn the collaboration's text: use one "
            f"of {list(METHODS)}")
  return None


STAGE_FNS: dict[str, Any] = {"collaborate": collaborate_stage, "distill": distill_stage}
