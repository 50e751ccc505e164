"""The single-multi evolution loop, checkpointed after every stage.

Round 0 evaluates every single model and the collaboration on the test split. Each round r >= 1:
  collaborate  the pool collaborates on the DEV split (the strategy fitted on dev first, where it
               learns anything); its outputs become training rows (prompt as generated + output)
  distill      every model trains on them at once (vmapped pool step, `distill.py`)
  evaluate     singles and the collaboration on test (the strategy refitted on dev with the new
               models)
Each stage is a host loop over batches of jitted programs (the whole strategy, the whole vmapped
train step, the whole pool decode are one program per batch), then text scoring on the host.
After every stage an Orbax checkpoint holds: round, stage, the pool params, the stage's outputs
(training rows), the metrics history and the rng seed; a killed run rerun with the same command
resumes after the last finished stage and, every stage being deterministic given its inputs, ends
with the same metrics as an uninterrupted run. (Interrupting inside a stage redoes that stage.)

`config.fused_round`: each round r >= 1 is one `jax.jit` program instead (`round_program`):
collaborate on all dev rows, build the training rows in token space (the output tokens exactly
as generated, ending in eos), run every optimizer step of the distillation in a `lax.scan`, and
decode the test rows with the distilled singles and the collaboration; tokenisation before,
text scoring after, one checkpoint per round. Strategies fitted on dev refit on the host before
the test evaluation, and multi_student_kd's best student is picked from the singles' dev answers
scored as text before the round program (two programs per round). on_policy_kd's students
sample their dev answers inside the program. The correctness filter is not available there.

With several devices the loop runs on `config.mesh` (`runtime_mesh`): in one process the pool's
params live on it for the whole loop, placed by `sharding.RULES`, and every program follows them.
The workdir may be local or a bucket path (gs://...; `etils.epath`). With several processes
(`multihost.py`) every process runs this loop: evaluation shards the examples, distillation runs
on the global mesh, process 0 writes the files, all processes take part in the checkpoints.

Beside this driver: `workdir.py` (the recorded config, the lock, the checkpoints and their
fingerprints) and `report.py` (round metrics, the console table, collapse, plots, summary.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from ml_collections import config_dict

from single_multi import collab, configs, decoding, distill, evaluate, multihost, pool as pool_lib
from single_multi import reward as reward_lib
from single_multi import rows as rows_lib, sharding
from single_multi.data import common, pipeline, tasks
from single_multi.collab import merge as merge_lib, token_level
from single_multi.configs import ConfigError
from single_multi.report import (collapsed, format_paired, format_round, round_metrics,
                                 run_summary, write_metrics)
from single_multi.workdir import Checkpoints, check_workdir_config, workdir_lock
from single_multi.models import loading
from single_multi.rows import own_half
from single_multi.spec import RunSpec, sample_key, strategy_config

STAGES = ("collaborate", "distill", "evaluate")


def stage_list(rounds: int, fused: bool = False) -> list[tuple[int, str]]:
  """The checkpointed stages in order: round 0's evaluation, then per round its three stages, or
  one "round" stage when each round is one program (`config.fused_round`)."""
  per_round = ("round",) if fused else STAGES
  return [(0, "evaluate")] + [(r, s) for r in range(1, rounds + 1) for s in per_round]


def runtime_mesh(config: config_dict.ConfigDict):
  """The mesh the loop runs on: `config.mesh` over every device of every process. None (one
  device) with a single device or an empty `config.mesh`."""
  axes = dict(config.get("mesh") or {})
  if jax.device_count() == 1 or not axes:
    return None
  return sharding.make_mesh(axes)


def placed(pool: pool_lib.Pool, mesh) -> pool_lib.Pool:
  """The pool with its params on `mesh` by the sharding rules (the pool axis over `model`)."""
  shardings = sharding.param_shardings(pool.config, mesh, pool_size=pool.size)
  return dataclasses.replace(pool, params=sharding.put(pool.params, shardings))


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and np.isfinite(v)


# Field -> (allowed?, what is allowed): checked before anything loads.
RANGES: dict[str, tuple[Any, str]] = {
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "k_shot": (lambda v: 0 <= v <= 64, "an integer in [0, 64]"),
    "dev_examples": (lambda v: v >= 1, "an integer >= 1"),
    "test_examples": (lambda v: v >= 1, "an integer >= 1"),
    "rounds": (lambda v: v >= 0, "an integer >= 0"),
    "keep_checkpoints": (lambda v: v >= 1, "an integer >= 1 (0 would keep nothing to resume "
                                           "from)"),
    "temperature": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    "top_p": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "specialist_steps": (lambda v: v >= 1, "an integer >= 1"),
    "specialist_examples": (lambda v: v >= 1, "an integer >= 1"),
    "specialist_learning_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "distill.accumulation": (lambda v: v >= 1, "an integer >= 1"),
    "distill.epochs": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.learning_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.lora_rank": (lambda v: v >= 0, "an integer >= 0 (0: full fine-tuning)"),
    "distill.lora_alpha": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "distill.warmup_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "distill.clip_norm": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clip)"),
    "distill.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "distill.max_norm_growth": (lambda v: _finite(v) and v > 1, "a finite factor > 1"),
    "compile_prompt_length": (lambda v: v >= 1, "an integer >= 1"),
}


def validate(config: config_dict.ConfigDict) -> None:
  """Every check that needs no compute, so a bad config fails before any model loads; each
  failure is a ConfigError (a ValueError) naming the field, the value and what is allowed."""
  try:
    _validate(config)
  except ConfigError:
    raise
  except ValueError as e:  # The dataclasses' own checks (strategy, distillation, optimizer).
    raise ConfigError(str(e)) from e


def _validate(config: config_dict.ConfigDict) -> None:
  fields = configs.leaves(config)
  for name, (ok, allowed) in RANGES.items():
    value = fields.get(name)
    if value is not None and not ok(value):
      raise ConfigError(f"{name}={value!r} is not allowed: give {allowed}")
  if not config.pool:
    raise ConfigError("pool is empty: give at least one model source")
  for name in [config.task, *config.specialists]:
    tasks.parse_name(name)  # Raises for an unknown task.
  spec = collab.get(config.strategy)
  size = len(config.specialists) if config.specialists else len(config.pool)
  if size < spec.min_models:
    raise ConfigError(f"strategy={config.strategy!r} needs at least {spec.min_models} models; "
                      f"the pool will have {size}" + (" (one per specialist)"
                                                      if config.specialists else "")
                      + ": give more models, or use strategy='single'")
  run_spec = RunSpec.of(config)  # The strategy's and the distillation's own field checks.
  scfg, method = run_spec.scfg, rows_lib.method(config.distill.method)
  level = spec.level
  if (level == "weight" and scfg.method in merge_lib.NEEDS_BASE and not config.get("merge_base")
      and not config.specialists):
    raise ConfigError(f"strategy={config.strategy!r} merges task vectors (member - base) and the "
                      "base is unknown: set --config.merge_base=<model source> (the model the "
                      "members were fine-tuned from), build the pool with `specialists` (their "
                      "base is pool[0]), or use strategy='linear'")
  if run_spec.fused and config.distill.correctness_filter:
    raise ConfigError("fused_round: the correctness filter scores the collaboration's dev answers "
                     "as text between collaborating and distilling, which one program cannot; "
                     "set fused_round=False or distill.correctness_filter=False")
  if run_spec.fused and method.traced is None:
    fused = sorted(n for n, m in rows_lib.METHODS.items() if m.traced is not None)
    raise ConfigError(f"fused_round: distill.method={config.distill.method!r} has no row builder "
                      f"inside the round program (rows.METHODS); set fused_round=False, or use "
                      f"one of {fused}")
  if run_spec.fused and spec.select is not None:
    raise ConfigError(f"fused_round: {config.strategy} votes on answers extracted from text on "
                      "the host (the reference's rule), which one program cannot; set "
                      "fused_round=False")
  if method.needs_combine and spec.combine is None:
    raise ConfigError(f"on_policy_kd scores the students' samples with the collaboration token "
                      f"by token; {config.strategy} cannot score given tokens: use one of "
                      f"{token_level.scoring_strategies()}, or distill.method='logit_kd' / "
                      "'supervised_kd'")
  if method.teacher and level not in ("logit", "token"):
    rowed = sorted(n for n, x in collab.REGISTRY.items() if x.level in ("logit", "token"))
    raise ConfigError(f"{config.distill.method} needs per-token teacher rows, which only logit- "
                      f"and token-level strategies produce; {config.strategy} is {level}-level: "
                      f"use one of {rowed}, or distill.method='supervised_kd'")


# -------------------------------------------------------------------------------------------------
# Stages.


@dataclasses.dataclass
class Loop:
  config: config_dict.ConfigDict
  pool: pool_lib.Pool
  task: tasks.Task
  dev: list[common.Example]
  test: list[common.Example]
  prompter: pipeline.Prompter
  progress: bool = True
  reward_model: Any = None  # Scores reward-model tasks' rows (loaded only for such tasks).
  merge_base: Any = None  # Task-vector merges: the base params, fixed across rounds.
  round_: int = 0  # The round being run (the driver sets it): part of every sampling key.

  @functools.cached_property
  def spec(self) -> RunSpec:
    """The config's strategy / distillation configs and samplers, parsed once."""
    return RunSpec.of(self.config)

  @property
  def kw(self) -> dict[str, Any]:
    return dict(prompter=self.prompter, task_name=self.task.name, metric=self.task.spec.metric,
                batch_size=self.config.batch_size, max_new_tokens=self.config.max_new_tokens,
                progress=self.progress, seed=self.config.seed, reference=self.dev,
                reward_model=self.reward_model, sampler=self.spec.sampler)

  def key(self, purpose: str) -> jax.Array:
    """The sampling key of (seed, round, purpose); rows fold in their example ids."""
    return sample_key(self.config.seed, self.round_, purpose)

  def singles(self, pool, examples, split, out_dir=None) -> evaluate.EvalResult:
    return evaluate.evaluate(pool, examples, split=split, method="generate", output_dir=out_dir,
                             key=self.key(f"{split}_singles"), **self.kw)

  def fit(self, pool, dev_scores: np.ndarray | None):
    """The strategy's dev-fitted state with the current models."""
    spec = collab.get(self.config.strategy)
    if spec.fit is None:
      return None
    env = collab.make_env(pool, self.config.strategy, self.spec.scfg,
                          max_new_tokens=self.config.max_new_tokens)
    data = next(iter(pipeline.generation_batches(self.dev, self.prompter,
                                                 batch_size=len(self.dev))))
    order = data["index"][data["index"] >= 0]  # The batch's row order (longest first).
    scores = None if dev_scores is None else dev_scores[:, order]
    dev = collab.DevData(collab.batch_from(data), scores, self._dev_evaluator(pool))
    kw = {"base": self.merge_base} if spec.level == "weight" else {}
    return collab.fit(pool, self.config.strategy, dev, env=env, cfg=self.spec.scfg, **kw)

  def _dev_evaluator(self, pool):
    def score(params):
      single = pool_lib.Pool(pool.config, jax.tree.map(lambda x: x[None], params), ("merged",),
                             pool.tokenizer)
      r = self.singles(single, self.dev, "dev")
      return r.summary["models"]["merged"]["score"]["mean"]
    return score

  def needs_dev_singles(self) -> bool:
    return (collab.get(self.config.strategy).fit is not None
            or rows_lib.method(self.config.distill.method).own_answers)

  def evaluate_test(self, pool, out_dir):
    """Singles and the collaboration on test, the strategy fitted on dev with these models
    first. Returns (singles, collaboration) results; records under out_dir."""
    scores = None
    if collab.get(self.config.strategy).fit is not None:
      scores = _scores_matrix(self.singles(pool, self.dev, "dev"), pool.names, self.dev)
    state = self.fit(pool, scores)
    return (self.singles(pool, self.test, "test", out_dir / "singles"),
            self.collaboration(pool, self.test, "test", state, out_dir / "collaboration"))

  def collaboration(self, pool, examples, split, state, out_dir=None):
    """The strategy's answers to `examples`, scored (an EvalResult under the strategy's name)."""
    return evaluate.evaluate(pool, examples, split=split, method="generate",
                             strategy=self.config.strategy,
                             strategy_cfg=self.spec.scfg, strategy_state=state,
                             output_dir=out_dir, key=self.key(f"{split}_collab"), **self.kw)


def merge_base_params(config, pool: pool_lib.Pool):
  """The base a task-vector merge is taken against (`config.merge_base`, else the specialists'
  base pool[0]), loaded once so it stays fixed across rounds; None for other strategies."""
  spec = collab.get(config.strategy)
  if spec.level != "weight" or strategy_config(config).method not in merge_lib.NEEDS_BASE:
    return None
  source = config.get("merge_base") or config.pool[0]
  base = loading.load(source, jnp.dtype(config.dtype), tokenizer=False)
  pool_lib.check_stackable([loading.Model(pool.config, None, None, "pool"), base],
                           ("the pool", f"merge_base {source}"))
  mesh = runtime_mesh(config)
  if mesh is None:
    return base.params
  return sharding.put(base.params, sharding.param_shardings(base.config, mesh))


def _scores_matrix(result: evaluate.EvalResult, names: Sequence[str], examples) -> np.ndarray:
  """[N, Q] per-model scores in the order of `examples`."""
  by = {(r["model"], r["id"]): r["score"] for r in result.records}
  return np.asarray([[by[(n, ex.id)] for ex in examples] for n in names], np.float32)


# -------------------------------------------------------------------------------------------------
# One round as one program (config.fused_round).


def _round_program(params_n, dev, test, order, keys, state, students=None, *, strategy, cfg, env,
                   dcfg, eos, evaluate_test, policy_sampler=None):
  """Collaborate on all dev rows -> the method's rows (`rows.METHODS[...].traced`) -> every
  optimizer step of the vmapped pool distillation (`distill.program`) -> [the distilled singles
  and the collaboration answer all test rows]. keys: per-row sampling keys {"dev_collab",
  "policy": [R]; "test_singles", "test_collab": [T]} (`Loop.key`, as the staged stages use
  them). students: multi_student_kd's singles' dev answers (`rows.TracedInputs`);
  policy_sampler: on_policy_kd's students' sampler."""
  run = collab.get(strategy).run
  out = run(params_n, dev, keys["dev_collab"], cfg=cfg, env=env, state=state)
  method = rows_lib.method(dcfg.method)
  if method.traced is None:  # `validate` refuses this before anything loads.
    raise NotImplementedError(f"the fused round builds no rows for distill.method="
                              f"{dcfg.method!r}; run it with fused_round=False")
  data = method.traced(rows_lib.TracedInputs(params_n, dev, out, keys, state, students, strategy,
                                             cfg, env, eos, policy_sampler))
  tail = rows_lib.traced_tail(method, env.max_new_tokens)
  per_model = data["tokens"].ndim == 3  # [N, R, T]: each model trains on its own rows.
  params_n, losses = distill.program(params_n, data, order, env.config, dcfg, tail, per_model)
  result = {"params": params_n, "losses": losses, "data": data,
            "dev": (out.tokens, out.lengths)}
  if evaluate_test:
    singles = pool_lib.decode_each(params_n, test.prompt, test.prompt_mask, keys["test_singles"],
                                   sampler=env.sampler, **env.decode_kw)
    together = run(params_n, test, keys["test_collab"], cfg=cfg, env=env, state=state)
    result["singles"] = (singles.tokens, singles.lengths)
    result["collab"] = (together.tokens, together.lengths)
  return result


round_program = jax.jit(_round_program, static_argnames=(
    "strategy", "cfg", "env", "dcfg", "eos", "evaluate_test", "policy_sampler"))


def fused_round(loop: Loop, pool, out_dir):
  """One round through `round_program`: tokenisation before (all dev rows, all test rows as one
  batch each), text scoring after. Where the round needs the singles' dev answers scored (a
  strategy fitted on dev; multi_student_kd's best student) they are decoded first, in token
  space, and scored on the host: two programs. A strategy fitted on dev is refitted on the host
  with the distilled models before the test evaluation, which then runs as its own programs
  (`Loop.singles` / `Loop.collaboration`). Returns (the distilled pool, singles and
  collaboration test results, distillation losses [steps, N]); the dev collaboration's records go
  to out_dir/collaboration_dev, the singles' dev answers (when decoded) to out_dir/singles_dev."""
  config, spec = loop.config, loop.spec
  dcfg, method = spec.dcfg, rows_lib.method(spec.dcfg.method)
  env = collab.make_env(pool, config.strategy, spec.scfg, max_new_tokens=config.max_new_tokens,
                        sampler=spec.sampler, return_rows=method.returns_rows)
  dev_data = next(iter(pipeline.generation_batches(loop.dev, loop.prompter,
                                                   batch_size=len(loop.dev))))
  test_data = next(iter(pipeline.generation_batches(loop.test, loop.prompter,
                                                    batch_size=len(loop.test))))
  dev_batch = collab.batch_from(dev_data)
  kw = dict(method="generate", metric=loop.task.spec.metric, task_name=loop.task.name,
            seed=config.seed, reference=loop.dev, reward_model=loop.reward_model)

  def scored(data, examples, names, out, split, directory):
    rows = [int(i) for i in data["index"] if i >= 0]
    tokens, lengths = (np.asarray(x) for x in out)
    if tokens.ndim == 2:  # The collaboration's [B, M]: one "model".
      tokens, lengths = tokens[None], lengths[None]
    records = evaluate.generation_records(examples, rows, names, tokens, lengths,
                                          pool.tokenizer, loop.task.spec.metric)
    return evaluate.finish(records, examples, names, split=split, output_dir=directory, **kw)

  def keys_for(data, examples, purpose):
    return evaluate.example_keys(loop.key(purpose), [examples[i] if i >= 0 else None
                                                     for i in data["index"]])

  scores, students = None, None
  if loop.needs_dev_singles():
    out = pool_lib.decode_each(pool.params, dev_batch.prompt, dev_batch.prompt_mask,
                               keys_for(dev_data, loop.dev, "dev_singles"), sampler=env.sampler,
                               **env.decode_kw)
    scores = _scores_matrix(scored(dev_data, loop.dev, pool.names, (out.tokens, out.lengths),
                                   "dev", out_dir / "singles_dev"), pool.names, loop.dev)
    if method.own_answers:
      students = (out.tokens, out.lengths, jnp.asarray(np.argmax(scores.mean(axis=1))),
                  jnp.asarray(own_half(loop)[dev_data["index"]]))  # In the batch's row order.
  state = loop.fit(pool, scores)
  refit = collab.get(config.strategy).fit is not None
  rows = len(loop.dev) * (2 if students is not None else 1)
  order = distill.step_order(rows, dcfg)
  keys = {"dev_collab": keys_for(dev_data, loop.dev, "dev_collab"),
          "policy": keys_for(dev_data, loop.dev, "policy"),
          "test_singles": keys_for(test_data, loop.test, "test_singles"),
          "test_collab": keys_for(test_data, loop.test, "test_collab")}
  res = round_program(pool.params, dev_batch, collab.batch_from(test_data),
                      jnp.asarray(order), keys, state, students, strategy=config.strategy,
                      cfg=spec.scfg, env=env, dcfg=dcfg,
                      eos=decoding.stop_ids_for(pool.config, pool.tokenizer)[0],
                      evaluate_test=not refit,
                      policy_sampler=spec.policy_sampler if method.needs_combine else None)
  losses = np.asarray(res["losses"])
  distill.check_finite(losses)
  distill.check_converging(losses, distill.param_norms(pool.params),
                           distill.param_norms(res["params"]), pool.config.vocab_size,
                           dcfg.optim.learning_rate, dcfg.max_norm_growth)
  pool = dataclasses.replace(pool, params=res["params"])
  scored(dev_data, loop.dev, (config.strategy,), res["dev"], "dev",
         out_dir / "collaboration_dev")
  if refit:
    singles, collab_r = loop.evaluate_test(pool, out_dir)
  else:
    singles = scored(test_data, loop.test, pool.names, res["singles"], "test",
                     out_dir / "singles")
    collab_r = scored(test_data, loop.test, (config.strategy,), res["collab"], "test",
                      out_dir / "collaboration")
  return pool, singles, collab_r, losses


# -------------------------------------------------------------------------------------------------
# The loop.


class Interrupted(RuntimeError):
  """Raised by `run(stop_after=k)` after checkpointing stage k (tests simulate a kill with it)."""


def run(config: config_dict.ConfigDict, workdir, pool: pool_lib.Pool, *, progress: bool = True,
        stop_after: int | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) the loop in `workdir`; returns the per-round metrics history."""
  validate(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock(workdir) as lock:
    check_workdir_config(config, workdir)
    return _run(config, workdir, pool, lock, progress=progress, stop_after=stop_after)


def _run(config, workdir, pool, lock, *, progress: bool, stop_after: int | None):
  primary = multihost.is_primary()
  progress = progress and primary
  if primary and jax.process_count() > 1:
    print(f"{jax.process_count()} processes, {jax.device_count()} devices in all")
  task = tasks.from_config(config.task, config)
  # Rows drawn evenly from every task family (seeded, stable); the test split's bad rows kept
  # so that the evaluation lists them as excluded.
  dev = common.balanced(task.dev, config.dev_examples, config.seed)
  test_split = task.examples(task.spec.test_split)
  test = (common.balanced(test_split, config.test_examples, config.seed)
          + [e for e in test_split if e.problem])
  if primary:
    print("rows per task: test " + ", ".join(f"{k} {v}" for k, v in common.composition(
        test).items()) + "; dev " + ", ".join(f"{k} {v}" for k, v in common.composition(
        dev).items()))
  shots = task.examples(task.spec.shot_split) if config.k_shot else ()
  prompter = pipeline.Prompter(pool.tokenizer, pipeline.PromptConfig(k_shot=config.k_shot,
                                                                 style=task.spec.prompt), shots)
  loop = Loop(config, pool, task, dev, test, prompter, progress,
              reward_lib.for_rows(dev + test, task.spec.metric, config.get("reward_model")),
              merge_base_params(config, pool))
  dcfg, method = loop.spec.dcfg, rows_lib.method(loop.spec.dcfg.method)
  stages = stage_list(config.rounds, loop.spec.fused)
  ckpt = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
  history: list[dict[str, Any]] = []
  distill_stats: dict[str, Any] = {}
  arrays: dict[str, np.ndarray] = {}
  start = 0

  def record(m: dict[str, Any]) -> None:  # A finished round: history, files, the table.
    history.append(m)
    if primary:
      write_metrics(workdir, history)
      print(format_round(m))
      for c in collapsed(m):
        print(f"WARNING: round {c['round']}: {c['model']} gives one answer to {c['share']:.0%} "
              "of the test rows (the gold answers are not that uniform): it has collapsed, and "
              "its score measures that answer's share of the gold, not what it learned.")

  # One process: the pool lives on the mesh for the whole loop (every program follows its params;
  # activations are constrained by the rules under `jax.set_mesh`). Several processes: evaluation
  # stays process-local and only distillation runs on the global mesh.
  mesh = runtime_mesh(config)
  local_mesh = mesh if jax.process_count() == 1 else None
  if local_mesh is not None:
    pool = placed(pool, local_mesh)
  with jax.set_mesh(local_mesh) if local_mesh is not None else contextlib.nullcontext():
    try:
      latest = ckpt.latest()
      if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None)), pool.params)
        params, arrays, meta = ckpt.restore(latest, abstract)
        pool = dataclasses.replace(pool, params=params)
        history, distill_stats = meta["history"], meta["distill_stats"]
        start = latest + 1
        logging.info("resuming after round %d stage %s", meta["round"], meta["stage"])
        if primary:
          print(f"Resuming from {workdir / 'checkpoints'}: round {meta['round']} "
                f"{meta['stage']} was the last finished stage.")
      for index in range(start, len(stages)):
        r, stage = stages[index]
        loop.round_ = r
        t0 = time.perf_counter()
        out_dir = workdir / f"round_{r}"
        if stage == "evaluate":
          singles, collab_r = loop.evaluate_test(pool, out_dir)
          m = round_metrics(r, singles, collab_r, pool.names, config.strategy)
          if str(r) in distill_stats:
            m["distill"] = distill_stats[str(r)]
          record(m)
          arrays = {}
        elif stage == "round":  # config.fused_round: the round as one program.
          pool, singles, collab_r, losses = fused_round(loop, pool, out_dir)
          distill_stats[str(r)] = distill.loss_stats(losses, dcfg)
          m = round_metrics(r, singles, collab_r, pool.names, config.strategy)
          m["distill"] = distill_stats[str(r)]
          record(m)
          arrays = {}
        elif stage == "collaborate":
          dev_singles = loop.singles(pool, dev, "dev") if loop.needs_dev_singles() else None
          scores = None if dev_singles is None else _scores_matrix(dev_singles, pool.names, dev)
          state = loop.fit(pool, scores)
          arrays = method.host(rows_lib.HostInputs(loop, pool, state, dev_singles, scores,
                                                   out_dir))
        else:  # distill
          before = distill.param_norms(pool.params)
          params, _, dhist = distill.distill(pool.params, arrays, pool.config, dcfg,
                                             per_model_batch=method.per_model, progress=progress,
                                             mesh=mesh)
          distill.check_converging(np.asarray([h["loss"] for h in dhist]), before,
                                   distill.param_norms(params), pool.config.vocab_size,
                                   dcfg.optim.learning_rate, dcfg.max_norm_growth)
          pool = dataclasses.replace(pool, params=params)
          distill_stats[str(r)] = distill.loss_stats([h["loss"] for h in dhist], dcfg)
          arrays = {}
        logging.info("round %d %s: %.1f s", r, stage, time.perf_counter() - t0)
        ckpt.save(index, pool.params, arrays, {"round": r, "stage": stage, "history": history,
                                               "distill_stats": distill_stats, "seed": config.seed,
                                               "config": json.loads(config.to_json())})
        if lock is not None:
          lock.heartbeat()
        if stop_after is not None and index == stop_after:
          raise Interrupted(f"stopped after stage {index} (round {r} {stage})")
    finally:
      ckpt.close()
  if primary:
    summary = run_summary(workdir, history, pool.names, config.strategy, test)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_paired(summary))
  return history
