"""What each distillation method trains on: one table, used by both round modes.

    rows.METHODS["supervised_kd"].host(HostInputs(...))      # staged loop, between stages
    rows.METHODS["supervised_kd"].traced(TracedInputs(...))  # inside the fused round program

Every method of `distill.METHODS` has one `Method` row here: `host` builds its training arrays
on the host between the staged loop's collaborate and distill stages (dev rows only); `traced`
builds the same rows inside `fused.round_program` from the collaboration's token output (None:
the method cannot run fused, and `spec.validate` refuses `fused_round` for it before anything
loads). Both build rows from the answers' tokens exactly as generated (never their text
re-tokenised), in the same row order, so the staged and fused loops train on the same arrays:
tests/test_evolve.py compares their records for supervised_kd, multi_student_kd and logit_kd
(on_policy_kd's fused rows are checked against teacher-forced scoring). The loss of each method
is `distill.make_loss`.

  supervised_kd     the collaboration's dev answers: prompt as generated + answer + eos
  multi_student_kd  per model: those rows, then half the dev rows with its own previous answer
                    and half with the best student's (best by dev score): [N, 2R, ...]
  logit_kd          the collaboration's answers with its per-token distributions ("teacher")
  on_policy_kd      per model: its own sampled answers, scored token by token by the
                    collaboration (`token_level.teacher_forced_rows`): [N, R, ...]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from single_multi import collab, decoding, distill, evaluate, multihost, pool as pool_lib
from single_multi.collab import token_level
from single_multi.data import common, pipeline


@dataclasses.dataclass(frozen=True)
class Method:
  host: Callable[[HostInputs], dict[str, np.ndarray]]
  traced: Callable[[TracedInputs], dict[str, jax.Array]] | None
  per_model: bool = False  # Arrays [N, R, ...]: each model trains on its own rows.
  teacher: bool = False  # Rows carry the collaboration's per-token distributions ("teacher").
  returns_rows: bool = False  # The dev collaboration must return its per-token rows.
  own_answers: bool = False  # Needs the singles' scored dev answers (before collaborating).
  eos_tail: bool = False  # Rows end in eos after the answer: the loss reads the last M + 1.
  needs_combine: bool = False  # The strategy must score given tokens (`Strategy.combine`).


# -------------------------------------------------------------------------------------------------
# Host builders (the staged loop).


@dataclasses.dataclass
class HostInputs:
  """What the staged collaborate stage hands a host builder. loop: `evolve.Loop` (config, spec,
  dev rows, prompter, sampling keys, `collaboration`); state: the strategy's dev-fitted state;
  dev_singles / scores: the singles' dev answers and their [N, R] scores (when decoded)."""

  loop: Any
  pool: pool_lib.Pool
  state: Any
  dev_singles: evaluate.EvalResult | None
  scores: np.ndarray | None
  out_dir: Any


class NoTrainingRows(common.DataError):
  """A round has nothing to distil (the correctness filter kept no collaborative output)."""


# A round's distillation record when it had no training rows.
SKIPPED = {"skipped": "no training rows", "steps": 0}


def or_skip(build: Callable[[], dict[str, np.ndarray]], r: int) -> dict[str, np.ndarray]:
  """The training rows `build()` makes for round r, or {} when there are none: the round then
  distils nothing (its members keep their params, `SKIPPED` is its record) and the loop goes on,
  so a sweep is not stopped by one strategy. Both loops (stacked and heterogeneous) use it."""
  try:
    return build()
  except NoTrainingRows as e:
    if multihost.is_primary():
      print(f"WARNING: round {r}: distillation skipped, no training rows: {e}", flush=True)
    return {}


def dev_batch(loop) -> dict[str, np.ndarray]:
  """All dev rows as one generation batch (longest first): the prompts exactly as generated, in
  the row order of the fused round's dev batch, so both round modes build the same rows."""
  return next(iter(pipeline.generation_batches(loop.dev, loop.prompter,
                                               batch_size=len(loop.dev))))


def answer_rows(loop, pool, data, answers: dict[str, Sequence[int]],
                keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Training rows in token space from generated answers (their `output_ids`, exactly as
  generated): `rows_with_eos` on `data`'s prompts, as the fused round builds them. keep [R]
  (by dev row): the rows to train on (the correctness filter)."""
  index = data["index"]
  width = loop.config.max_new_tokens
  tokens = np.zeros((len(index), width), np.int32)
  lengths = np.zeros((len(index),), np.int32)
  for b, i in enumerate(index):
    if i >= 0:
      ids = answers[loop.dev[i].id]
      tokens[b, :len(ids)], lengths[b] = ids, len(ids)
  stop_ids = decoding.stop_ids_for(pool.config, pool.tokenizer)
  rows = rows_with_eos(data["tokens"], data["mask"], tokens, lengths, stop_ids, stop_ids[0])
  live = (index >= 0) & (True if keep is None else keep[np.maximum(index, 0)])
  if not live.any():
    raise NoTrainingRows("every collaborative dev output was filtered out (the correctness "
                         "filter kept none)")
  return {k: np.asarray(v)[live] for k, v in zip(("tokens", "mask", "loss_mask"), rows)}


def _collaboration_rows(x: HostInputs, data) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """The collaboration's dev answers as rows of `data` (`dev_batch`), and the correctness
  filter's keep mask."""
  res = x.loop.collaboration(x.pool, x.loop.dev, "dev", x.state, x.out_dir / "collaboration_dev",
                             members=x.dev_singles)
  by_id = {r["id"]: r for r in res.records}
  keep = None
  if x.loop.spec.dcfg.correctness_filter:
    keep = np.asarray([by_id[ex.id]["score"] > 0 for ex in x.loop.dev])
  answers = {i: r["output_ids"] for i, r in by_id.items()}
  return answer_rows(x.loop, x.pool, data, answers, keep), keep


def _supervised_host(x: HostInputs) -> dict[str, np.ndarray]:
  return _collaboration_rows(x, dev_batch(x.loop))[0]


def own_half(loop) -> np.ndarray:
  """[R] bool: the dev rows on which multi_student_kd trains each model on its own answer (the
  others on the best student's); a seeded half by example id."""
  return np.asarray([common.split_fraction(ex.id, loop.config.seed) < 0.5 for ex in loop.dev])


def multi_student_rows(loop, pool, data, dev_singles, scores, collab_rows, keep):
  """Per model: the collaboration's rows, then half the dev rows with its own previous answer
  and half with the best student's (best by dev score): arrays [N, 2R, T]."""
  best = int(np.argmax(scores.mean(axis=1)))
  by = {(x["model"], x["id"]): x["output_ids"] for x in dev_singles.records}
  half = own_half(loop)
  per_model = []
  for name in pool.names:
    answers = {ex.id: by[(name if half[k] else pool.names[best], ex.id)]
               for k, ex in enumerate(loop.dev)}
    own = answer_rows(loop, pool, data, answers, keep)
    per_model.append({k: np.concatenate([collab_rows[k], own[k]]) for k in collab_rows})
  return {k: np.stack([r[k] for r in per_model]) for k in collab_rows}


def _multi_student_host(x: HostInputs) -> dict[str, np.ndarray]:
  data = dev_batch(x.loop)
  collab_rows, keep = _collaboration_rows(x, data)
  return multi_student_rows(x.loop, x.pool, data, x.dev_singles, x.scores, collab_rows, keep)


def teacher_rows(loop, pool, state, on_policy: bool) -> dict[str, np.ndarray]:
  """Dev rows with the collaboration's per-token rows: its own outputs (logit_kd), or each
  student's samples scored by the collaboration (on_policy_kd: arrays [N, R, ...])."""
  spec = loop.spec
  env = collab.make_env(pool, spec.strategy, spec.scfg, max_new_tokens=loop.config.max_new_tokens,
                        sampler=spec.sampler, return_rows=True)
  per_batch = []
  for data in pipeline.generation_batches(loop.dev, loop.prompter,
                                          batch_size=loop.config.batch_size):
    live = data["index"] >= 0
    batch = collab.batch_from(data)
    rows_of = [loop.dev[i] if i >= 0 else None for i in data["index"]]
    if not on_policy:
      out = collab.run(pool, spec.strategy, batch, env=env, cfg=spec.scfg, state=state,
                       rng=evaluate.example_keys(loop.key("dev_collab"), rows_of))
      tokens, mask, loss = distill.sequences(batch.prompt, batch.prompt_mask, out.tokens,
                                             out.lengths)
      per_batch.append({"tokens": tokens[live], "mask": mask[live], "loss_mask": loss[live],
                        "teacher": out.rows[live]})
      continue
    combine = token_level.combine_for(spec.strategy, spec.scfg, state=state)
    sample = pool_lib.decode_each(pool.params, batch.prompt, batch.prompt_mask,
                                  evaluate.example_keys(loop.key("policy"), rows_of),
                                  sampler=spec.policy_sampler, **env.decode_kw)
    rows = []
    for i in range(pool.size):
      tokens, mask, loss = distill.sequences(batch.prompt, batch.prompt_mask, sample.tokens[i],
                                             sample.lengths[i])
      teacher = token_level.teacher_forced_rows(pool.params, tokens, mask, env.max_new_tokens,
                                                combine, env)
      rows.append({"tokens": tokens[live], "mask": mask[live], "loss_mask": loss[live],
                   "teacher": teacher[live]})
    per_batch.append({k: jnp.stack([r[k] for r in rows]) for k in rows[0]})
  width = max(b["tokens"].shape[-1] for b in per_batch)
  axis = 1 if on_policy else 0

  def pad(x, key):  # Left-pad the sequence axis to a common width (teacher rows untouched).
    if key == "teacher":
      return np.asarray(x)
    extra = width - x.shape[-1]
    return np.pad(np.asarray(x), [(0, 0)] * (x.ndim - 1) + [(extra, 0)])

  return {k: np.concatenate([pad(b[k], k) for b in per_batch], axis=axis) for k in per_batch[0]}


# -------------------------------------------------------------------------------------------------
# Traced builders (inside the fused round program).


class TracedInputs(NamedTuple):
  """What the round program hands a traced builder. out: the collaboration's output on all dev
  rows; keys: per-row sampling keys by purpose; students (multi_student_kd): the singles' dev
  tokens [N, R, M], lengths [N, R], the best student's index and own [R] (rows where a model
  learns its own answer); None leaves only the collaboration's rows (the compile plan)."""

  params_n: Any
  dev: collab.Batch
  out: collab.Output
  keys: dict[str, jax.Array]
  state: Any
  students: Any
  strategy: str
  cfg: Any
  env: collab.Env
  eos: int
  policy_sampler: Any


def rows_with_eos(prompt, prompt_mask, tokens, lengths, stop_ids: Sequence[int], eos: int):
  """Training rows in token space: the prompt as generated, then the output tokens exactly as
  generated, ending in eos (a final stop token becomes eos; an answer cut off at the token limit
  gets one). Rows [B, P + M + 1]; the loss covers the output and its eos."""
  B = tokens.shape[0]
  tokens = jnp.pad(tokens, ((0, 0), (0, 1)))
  last = jnp.take_along_axis(tokens, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
  stopped = (lengths > 0) & jnp.isin(last, jnp.asarray(stop_ids, tokens.dtype))
  at = jnp.where(stopped, lengths - 1, lengths)
  tokens = tokens.at[jnp.arange(B), at].set(eos)
  return distill.sequences(prompt, prompt_mask, tokens, at + 1)


def _eos_rows(x: TracedInputs, tokens, lengths) -> dict[str, jax.Array]:
  t, m, lm = rows_with_eos(x.dev.prompt, x.dev.prompt_mask, tokens, lengths, x.env.stop_ids,
                           x.eos)
  return {"tokens": t, "mask": m, "loss_mask": lm}


def _supervised_traced(x: TracedInputs) -> dict[str, jax.Array]:
  return _eos_rows(x, x.out.tokens, x.out.lengths)


def _multi_student_traced(x: TracedInputs) -> dict[str, jax.Array]:
  data = _supervised_traced(x)
  if x.students is None:
    return data
  s_tokens, s_lengths, best, own = x.students
  chosen = (jnp.where(own[None, :, None], s_tokens, s_tokens[best][None]),
            jnp.where(own[None], s_lengths, s_lengths[best][None]))
  mine = jax.vmap(lambda t, n: _eos_rows(x, t, n))(*chosen)
  n = s_tokens.shape[0]
  return {k: jnp.concatenate([jnp.broadcast_to(v, (n, *v.shape)), mine[k]], axis=1)
          for k, v in data.items()}


def _logit_traced(x: TracedInputs) -> dict[str, jax.Array]:
  # Rows end with the output; the teacher row of each its token.
  tokens, mask, loss_mask = distill.sequences(x.dev.prompt, x.dev.prompt_mask, x.out.tokens,
                                              x.out.lengths)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "teacher": x.out.rows}


def _on_policy_traced(x: TracedInputs) -> dict[str, jax.Array]:
  sample = pool_lib.decode_each(x.params_n, x.dev.prompt, x.dev.prompt_mask, x.keys["policy"],
                                sampler=x.policy_sampler, **x.env.decode_kw)
  combine = token_level.combine_for(x.strategy, x.cfg, state=x.state)

  def own_rows(tokens, lengths):  # One model's samples, scored by the collaboration.
    t, m, lm = distill.sequences(x.dev.prompt, x.dev.prompt_mask, tokens, lengths)
    teacher = token_level.teacher_forced_rows(x.params_n, t, m, x.env.max_new_tokens, combine,
                                              x.env)
    return {"tokens": t, "mask": m, "loss_mask": lm, "teacher": teacher}

  return jax.tree.map(lambda *v: jnp.stack(v), *[
      own_rows(sample.tokens[i], sample.lengths[i]) for i in range(sample.tokens.shape[0])])


# -------------------------------------------------------------------------------------------------
# The table.


METHODS: dict[str, Method] = {
    "supervised_kd": Method(_supervised_host, _supervised_traced, eos_tail=True),
    "multi_student_kd": Method(_multi_student_host, _multi_student_traced, per_model=True,
                               own_answers=True, eos_tail=True),
    "logit_kd": Method(lambda x: teacher_rows(x.loop, x.pool, x.state, on_policy=False),
                       _logit_traced, teacher=True, returns_rows=True),
    "on_policy_kd": Method(lambda x: teacher_rows(x.loop, x.pool, x.state, on_policy=True),
                           _on_policy_traced, per_model=True, teacher=True, needs_combine=True),
}


def per_model(dcfg: distill.DistillConfig) -> bool:
  """Whether a round's training arrays are [N, R, ...], each member's own rows: the method's
  (`Method.per_model`), or each member's specialist rows replayed (`pools.replay_rows`)."""
  return method(dcfg.method).per_model or dcfg.replay > 0


def method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f"unknown distillation method {name!r}; choose one of {list(METHODS)}")
  return METHODS[name]


def traced_tail(m: Method, max_new_tokens: int) -> int | None:
  """How many final positions of a fused round's rows the loss reads (None: all of them)."""
  return max_new_tokens + 1 if m.eos_tail else None
