"""The single-multi evolution loop, checkpointed after every stage.

Round 0 evaluates every single model and the collaboration on the test split. Each round r >= 1:
  collaborate  the pool collaborates on the DEV split (the strategy fitted on dev first, where it
               learns anything); its outputs become training rows (prompt as generated + output)
  distill      every model trains on them at once (vmapped pool step, `distill.py`)
  evaluate     singles and the collaboration on test (the strategy refitted on dev with the new
               models)
The driver is a table of stages (`STAGE_FNS`), each `fn(driver, state, round) -> state`, where the
`State` is exactly what a checkpoint holds: the pool params, the stage's outputs (training rows),
the metrics history and the distillation statistics. Each stage is a host loop over batches of
jitted programs (the whole strategy, the whole vmapped train step, the whole pool decode are one
program per batch), then text scoring on the host. After every stage the state is checkpointed
(Orbax); a killed run rerun with the same command resumes after the last finished stage and,
every stage being deterministic given its inputs, ends with the same metrics as an uninterrupted
run. (Interrupting inside a stage redoes that stage.)

`config.pool_kind="heterogeneous"` (members of different architectures or tokenizers): the pool
is a `pool.Groups`, the stages exchange text between its groups and each group distils its own
rows (`hetero_loop.py`, whose collaborate and distill stages replace the table's).

`config.fused_round`: each round r >= 1 is one `jax.jit` program instead (`fused.py`), one
checkpoint per round. What each distillation method trains on is one entry of `rows.METHODS`,
used by both round modes; the config is parsed and validated once (`spec.py`).

With several devices the loop runs on `config.mesh` (`runtime_mesh`): in one process the pool's
params live on it for the whole loop, placed by `sharding.RULES`, and every program follows them.
The workdir may be local or a bucket path (gs://...; `etils.epath`). With several processes
(`multihost.py`) every process runs this loop: evaluation shards the examples, distillation runs
on the global mesh, process 0 writes the files, all processes take part in the checkpoints.

Beside this driver: `spec.py` (the run spec, validation, sampling keys), `rows.py` (training rows
per method), `fused.py` (the round as one program), `workdir.py` (the recorded config, the lock,
the checkpoints and their fingerprints) and `report.py` (round metrics, the console table,
collapse, plots, summary.json).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from ml_collections import config_dict

from single_multi import collab, decoding, distill, evaluate, fused, hetero_loop, multihost, pools
from single_multi import pool as pool_lib
from single_multi import reward as reward_lib
from single_multi import rows as rows_lib, sharding
from single_multi.data import common, pipeline, tasks
from single_multi.collab import merge as merge_lib
from single_multi.configs import ConfigError
from single_multi.report import (collapsed, format_paired, format_round, read_timings,
                                 round_metrics, run_summary, write_metrics, write_timings)
from single_multi.workdir import Checkpoints, check_workdir_config, workdir_lock
from single_multi.models import loading
from single_multi.spec import RunSpec, sample_key, strategy_config, validate

# The loop's entry points; validate and ConfigError live in spec.py, the fused round in fused.py.
__all__ = ["ConfigError", "Interrupted", "Loop", "State", "STAGE_FNS", "make_loop", "run",
           "stage_list", "validate"]

STAGES = ("collaborate", "distill", "evaluate")


def stage_list(rounds: int, one_program: bool = False) -> list[tuple[int, str]]:
  """The checkpointed stages in order: round 0's evaluation, then per round its three stages, or
  one "round" stage when each round is one program (`config.fused_round`)."""
  per_round = ("round",) if one_program else STAGES
  return [(0, "evaluate")] + [(r, s) for r in range(1, rounds + 1) for s in per_round]


def runtime_mesh(config: config_dict.ConfigDict):
  """The mesh the loop runs on: `config.mesh` over every device of every process. None (one
  device) with a single device or an empty `config.mesh`."""
  axes = dict(config.get("mesh") or {})
  if jax.device_count() == 1 or not axes:
    return None
  return sharding.make_mesh(axes)


def placed(pool: pool_lib.Pool | pool_lib.Groups, mesh) -> pool_lib.Pool | pool_lib.Groups:
  """The pool with its params on `mesh` by the sharding rules (the pool axis over `model`);
  a heterogeneous pool: each group's."""
  if isinstance(pool, pool_lib.Groups):
    return dataclasses.replace(pool, pools=tuple(placed(p, mesh) for p in pool.pools))
  shardings = sharding.param_shardings(pool.config, mesh, pool_size=pool.size)
  return dataclasses.replace(pool, params=sharding.put(pool.params, shardings))


# -------------------------------------------------------------------------------------------------
# Stages.


@dataclasses.dataclass
class Stopwatch:
  """Host wall seconds per part of the stage being run ("singles", "fit", "collaboration",
  "base"): where a run's time goes (`timings.jsonl`). A part timed inside another (a merge's fit
  scoring candidate merges as singles) counts in the outer one only."""

  parts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  depth: int = 0
  clock: Any = time.perf_counter

  @contextlib.contextmanager
  def part(self, name: str):
    self.depth += 1
    t0 = self.clock()
    try:
      yield
    finally:
      self.depth -= 1
      if not self.depth:
        self.parts[name] += self.clock() - t0

  def take(self) -> dict[str, float]:
    """The parts timed since the last take, and a fresh start."""
    parts, self.parts = dict(self.parts), collections.Counter()
    return parts


@dataclasses.dataclass
class Loop:
  config: config_dict.ConfigDict
  pool: pool_lib.Pool | pool_lib.Groups
  task: tasks.Task
  dev: list[common.Example]
  test: list[common.Example]
  prompter: pipeline.Prompter
  progress: bool = True
  reward_model: Any = None  # Scores reward-model tasks' rows (loaded only for such tasks).
  merge_base: Any = None  # Task-vector merges: the base params, fixed across rounds.
  round_: int = 0  # The round being run (the driver sets it): part of every sampling key.
  prompters: tuple[pipeline.Prompter, ...] = ()  # A heterogeneous pool: one per group.
  # The rows strategies are fitted on (router labels, best-on-dev choices, merge weights): the
  # dev rows themselves (the reference), or held-out dev rows (`fit_examples`).
  fit_rows: list[common.Example] | None = None
  watch: Stopwatch = dataclasses.field(default_factory=Stopwatch)
  memo: str | None = None  # The kept evaluations' directory (`eval_cache_dir`); None: off.

  def __post_init__(self):
    if self.fit_rows is None:
      self.fit_rows = self.dev

  @functools.cached_property
  def spec(self) -> RunSpec:
    """The config's strategy / distillation configs and samplers, parsed once."""
    return RunSpec.of(self.config)

  @property
  def kw(self) -> dict[str, Any]:
    return dict(prompter=self.prompter, task_name=self.task.name, metric=self.task.spec.metric,
                batch_size=self.config.batch_size, max_new_tokens=self.config.max_new_tokens,
                progress=self.progress, seed=self.config.seed, reference=self.dev,
                reward_model=self.reward_model, sampler=self.spec.sampler,
                memo=self.memo)

  def key(self, purpose: str) -> jax.Array:
    """The sampling key of (seed, round, purpose); rows fold in their example ids."""
    return sample_key(self.config.seed, self.round_, purpose)

  def singles(self, pool, examples, split, out_dir=None) -> evaluate.EvalResult:
    with self.watch.part("singles"):
      if isinstance(pool, pool_lib.Groups):
        return hetero_loop.singles(self, pool, examples, split, out_dir)
      return evaluate.evaluate(pool, examples, split=split, method="generate",
                               output_dir=out_dir, key=self.key(f"{split}_singles"), **self.kw)

  def fit(self, pool, dev_scores: np.ndarray | None):
    """The strategy's state fitted on `fit_rows` (dev_scores [N, len(fit_rows)]: the current
    models' scores there) with the current models."""
    spec = collab.get(self.config.strategy)
    if spec.fit is None:
      return None
    with self.watch.part("fit"):
      return self._fit(pool, spec, dev_scores)

  def _fit(self, pool, spec, dev_scores):
    if isinstance(pool, pool_lib.Groups):
      return hetero_loop.fit(self, dev_scores)
    env = collab.make_env(pool, self.config.strategy, self.spec.scfg,
                          max_new_tokens=self.config.max_new_tokens)
    data = next(iter(pipeline.generation_batches(self.fit_rows, self.prompter,
                                                 batch_size=len(self.fit_rows))))
    order = data["index"][data["index"] >= 0]  # The batch's row order (longest first).
    scores = None if dev_scores is None else dev_scores[:, order]
    dev = collab.DevData(collab.batch_from(data), scores, self._dev_evaluator(pool))
    kw = {"base": self.merge_base} if spec.level == "weight" else {}
    return collab.fit(pool, self.config.strategy, dev, env=env, cfg=self.spec.scfg, **kw)

  def _dev_evaluator(self, pool):
    def score(params):
      single = pool_lib.Pool(pool.config, jax.tree.map(lambda x: x[None], params), ("merged",),
                             pool.tokenizer)
      r = self.singles(single, self.fit_rows, self.fit_split)
      return r.summary["models"]["merged"]["score"]["mean"]
    return score

  @property
  def fit_split(self) -> str:
    """The fit rows' split label (records, sampling keys): "dev" when they are the dev rows."""
    return "dev" if self.fit_rows is self.dev else "fit"

  @property
  def scored_split(self) -> str:
    """What the `test` rows are, as outputs name them: "test", or "validation" (held-out dev
    rows) under evaluate_on."""
    return self.config.get("evaluate_on", "test")

  def fit_scores(self, pool, dev_singles=None) -> np.ndarray | None:
    """[N, len(fit_rows)]: every model's scores on the fit rows (None when the strategy fits
    nothing); dev_singles: the singles' results on the dev rows, reused when those are the fit
    rows."""
    if collab.get(self.config.strategy).fit is None:
      return None
    if dev_singles is None or self.fit_rows is not self.dev:
      dev_singles = self.singles(pool, self.fit_rows, self.fit_split)
    return evaluate.scores_matrix(dev_singles, pool.names, self.fit_rows)

  def needs_dev_singles(self) -> bool:
    return (collab.get(self.config.strategy).fit is not None
            or rows_lib.method(self.config.distill.method).own_answers)

  def evaluate_test(self, pool, out_dir):
    """Singles and the collaboration on test, the strategy fitted on the fit rows with these
    models first. Returns (singles, collaboration) results; records under out_dir."""
    state = self.fit(pool, self.fit_scores(pool))
    singles = self.singles(pool, self.test, "test", out_dir / "singles")
    return singles, self.collaboration(pool, self.test, "test", state, out_dir / "collaboration",
                                       members=singles)

  def collaboration(self, pool, examples, split, state, out_dir=None, members=None):
    """The strategy's answers to `examples`, scored (an EvalResult under the strategy's name).
    members: the singles' results on the same examples; a router takes its chosen member's
    answer from them instead of decoding every member again (`evaluate.evaluate`)."""
    with self.watch.part("collaboration"):
      if isinstance(pool, pool_lib.Groups):
        return hetero_loop.collaboration(self, pool, examples, split, state, out_dir)
      return evaluate.evaluate(pool, examples, split=split, method="generate",
                               strategy=self.config.strategy,
                               strategy_cfg=self.spec.scfg, strategy_state=state,
                               output_dir=out_dir, key=self.key(f"{split}_collab"),
                               members=members, **self.kw)


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


# -------------------------------------------------------------------------------------------------
# The loop.


class Interrupted(RuntimeError):
  """Raised by `run(stop_after=k)` after checkpointing stage k (tests simulate a kill with it)."""


def run(config: config_dict.ConfigDict, workdir, pool: pool_lib.Pool | pool_lib.Groups, *,
        progress: bool = True, stop_after: int | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) the loop in `workdir`; returns the per-round metrics history."""
  validate(config)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock(workdir) as lock:
    check_workdir_config(config, workdir)
    return _run(config, workdir, pool, lock, progress=progress, stop_after=stop_after)


def eval_cache_dir(config: config_dict.ConfigDict, workdir=None) -> str | None:
  """Where the loop keeps its evaluations (`eval_memo.py`): `config.eval_cache`, "workdir" being
  `<workdir>/eval_cache` (a resumed run re-scores nothing it scored); None when off ("") or when
  "workdir" has no workdir (a Loop made outside `run`, e.g. by a test, keeps nothing)."""
  setting = config.get("eval_cache") or ""
  if setting != "workdir":
    return setting or None
  return None if workdir is None else str(epath.Path(workdir) / "eval_cache")


def make_loop(config: config_dict.ConfigDict, pool: pool_lib.Pool | pool_lib.Groups,
              progress: bool, workdir=None) -> Loop:
  """The task's dev and test rows drawn evenly from every task family (seeded, stable; the test
  split's bad rows kept so that the evaluation lists them as excluded), the rows strategies are
  fitted on (the dev rows, or `fit_examples` held-out dev rows), the prompter, the reward model
  (reward tasks), the merge base (task-vector merges) and the kept evaluations' directory."""
  memo = eval_cache_dir(config, workdir)
  task = tasks.from_config(config.task, config)
  dev = common.balanced(task.dev, config.dev_examples, config.seed)
  scored = config.get("evaluate_on", "test")  # Loop.scored_split
  validating = scored == "validation"
  n_fit = config.get("fit_examples", 0)
  # The validation rows come first and the fit rows avoid them in either mode, so that neither
  # selection depends on the other setting: runs that differ in fit_examples are paired on the
  # same validation rows, and a setting chosen there is tested with the same fit rows.
  val = (held_out_dev_rows(config, task, dev, config.test_examples, "validation rows")
         if validating or n_fit else [])
  fit = held_out_dev_rows(config, task, dev + val, n_fit, "fit rows") if n_fit else dev
  separate = [] if fit is dev else fit
  if validating:
    test = val
  else:
    test_split = task.examples(task.spec.test_split)
    test = (common.balanced(test_split, config.test_examples, config.seed)
            + [e for e in test_split if e.problem])
  if multihost.is_primary():
    comp = lambda rows: ", ".join(f"{k} {v}" for k, v in common.composition(rows).items())
    print(f"rows per task: {scored} {comp(test)}; dev {comp(dev)}"
          + (f"; fit {comp(fit)}" if separate else ""))
  shots = task.examples(task.spec.shot_split) if config.k_shot else ()
  prompt = pipeline.PromptConfig(k_shot=config.k_shot, style=task.spec.prompt)
  groups = pool.pools if isinstance(pool, pool_lib.Groups) else (pool,)
  prompters = tuple(pipeline.Prompter(p.tokenizer, prompt, shots) for p in groups)
  return Loop(config, pool, task, dev, test, prompters[0], progress,
              reward_lib.for_rows(dev + separate + test, task.spec.metric,
                                  config.get("reward_model")),
              merge_base_params(config, pool), prompters=prompters, fit_rows=fit, memo=memo)


def held_out_dev_rows(config: config_dict.ConfigDict, task, held: list[common.Example],
                      count: int, what: str) -> list[common.Example]:
  """`count` rows of the task's dev split, drawn evenly per family (`common.balanced`), none of
  which is among `held` (the loop's dev rows, ...) or any specialist's training rows (by question
  text; checked). The fit rows (`fit_examples`: strategies fitted on rows the members were not
  distilled on) and the validation rows (`evaluate_on="validation"`: a setting chosen without
  looking at a test score) are drawn this way."""
  held = list(held)
  for name in config.get("specialists", ()) or ():
    held += pools.specialist_rows(config, name)
  taken = {common.normalize_question(e.question) for e in held}
  rows = [e for e in task.dev
          if not e.problem and common.normalize_question(e.question) not in taken]
  rows = common.balanced(rows, count, config.seed)
  common.check_disjoint([e.question for e in rows], [e.question for e in held],
                        f"{what} vs the loop's dev and specialist rows")
  return rows


@dataclasses.dataclass(frozen=True)
class State:
  """What passes from stage to stage: exactly what a checkpoint holds (`Checkpoints.save`)."""

  pool: pool_lib.Pool | pool_lib.Groups  # Its params are the checkpoint's `params` item.
  arrays: dict[str, np.ndarray]  # The stage's outputs (training rows), else empty.
  history: list[dict[str, Any]]  # Per finished round, its metrics.
  distill_stats: dict[str, Any]  # Per distilled round ("1", ...), its loss statistics.


@dataclasses.dataclass
class Driver:
  """What the stages need besides the state: the loop, where files go, the distillation mesh."""

  loop: Loop
  workdir: Any
  mesh: Any
  progress: bool

  def record(self, st: State, m: dict[str, Any]) -> State:
    """A finished round: appended to the history; process 0 writes the files and the table."""
    history = [*st.history, m]
    if multihost.is_primary():
      split = self.loop.scored_split
      write_metrics(self.workdir, history, split)
      print(format_round(m))
      for c in collapsed(m):
        print(f"WARNING: round {c['round']}: {c['model']} gives one answer to {c['share']:.0%} "
              f"of the {split} rows (the gold answers are not that uniform): it has collapsed, and "
              "its score measures that answer's share of the gold, not what it learned.")
    return dataclasses.replace(st, history=history, arrays={})


# The stages: fn(driver, state, round) -> state.


def specialist_scores(loop: Loop, m: dict[str, Any], names, out_dir) -> dict[str, Any]:
  """Each specialist's task, the base's score on that family's test rows and the specialist's
  own (round 0): whether the specialists differ where the pool is built from them. The base
  answers only the rows of the specialists' families (records under out_dir)."""
  config = loop.config
  families = {n: t.split(":", 1)[-1] for n, t in zip(names, config.specialists)}
  rows = [e for e in loop.test if not e.problem and e.subject in families.values()]
  base = {}
  if rows:
    with loop.watch.part("base"):
      model = loading.load(config.pool[0], jnp.dtype(config.dtype))
      result = evaluate.evaluate(model, rows, split="test", method="generate",
                                 output_dir=out_dir, key=loop.key("test_singles"), **loop.kw)
    base = result.summary["models"][model.source]["by_subject"]
  return {n: {"task": config.specialists[i], "base": base.get(families[n]),
              "score": m["by_task"][n].get(families[n])} for i, n in enumerate(names)}


def evaluate_stage(d: Driver, st: State, r: int) -> State:
  """Singles and the collaboration on test (the strategy refitted on dev first); at round 0 of
  a pool built from specialists, also the base on their families' test rows."""
  singles, collab_r = d.loop.evaluate_test(st.pool, d.workdir / f"round_{r}")
  m = round_metrics(r, singles, collab_r, st.pool.names, d.loop.config.strategy)
  if r == 0 and d.loop.config.get("specialists") and isinstance(st.pool, pool_lib.Pool):
    m["specialists"] = specialist_scores(d.loop, m, st.pool.names, d.workdir / "round_0" / "base")
  if str(r) in st.distill_stats:
    m["distill"] = st.distill_stats[str(r)]
  return d.record(st, m)


def collaborate_stage(d: Driver, st: State, r: int) -> State:
  """The collaboration on dev -> the distillation method's training rows (`rows.METHODS`)."""
  loop, pool = d.loop, st.pool
  dev_singles = loop.singles(pool, loop.dev, "dev") if loop.needs_dev_singles() else None
  scores = None if dev_singles is None else evaluate.scores_matrix(dev_singles, pool.names, loop.dev)
  state = loop.fit(pool, loop.fit_scores(pool, dev_singles))
  arrays = rows_lib.or_skip(lambda: rows_lib.method(loop.spec.dcfg.method).host(
      rows_lib.HostInputs(loop, pool, state, dev_singles, scores, d.workdir / f"round_{r}")), r)
  if arrays and loop.spec.dcfg.replay:  # [N, R + k, T]: each member's own specialist rows added.
    eos = decoding.stop_ids_for(pool.config, pool.tokenizer)[0]
    arrays = pools.replay_rows(loop.config, pool.tokenizer, eos, arrays, loop.spec.dcfg.replay)
  return dataclasses.replace(st, arrays=arrays)


def distill_stage(d: Driver, st: State, r: int) -> State:
  """Every model trains on the rows at once (the vmapped pool step, `distill.distill`)."""
  dcfg, pool = d.loop.spec.dcfg, st.pool
  if not st.arrays:  # collaborate_stage found no training rows: nothing changes this round.
    return State(pool, {}, st.history, {**st.distill_stats, str(r): rows_lib.SKIPPED})
  params, losses = distill.train_pool(pool.params, st.arrays, pool.config, dcfg,
                                      per_model_batch=rows_lib.per_model(dcfg),
                                      progress=d.progress, mesh=d.mesh)
  return State(dataclasses.replace(pool, params=params), {}, st.history,
               {**st.distill_stats, str(r): distill.loss_stats(losses, dcfg)})


def round_stage(d: Driver, st: State, r: int) -> State:
  """config.fused_round: collaborate, distill and evaluate as one program (`fused_round`)."""
  pool, singles, collab_r, losses = fused.fused_round(d.loop, st.pool, d.workdir / f"round_{r}")
  stats = distill.loss_stats(losses, d.loop.spec.dcfg)
  m = round_metrics(r, singles, collab_r, pool.names, d.loop.config.strategy)
  m["distill"] = stats
  st = State(pool, {}, st.history, {**st.distill_stats, str(r): stats})
  return d.record(st, m)


STAGE_FNS = {"evaluate": evaluate_stage, "collaborate": collaborate_stage,
             "distill": distill_stage, "round": round_stage}


def _run(config, workdir, pool, lock, *, progress: bool, stop_after: int | None):
  primary = multihost.is_primary()
  progress = progress and primary
  if primary and jax.process_count() > 1:
    print(f"{jax.process_count()} processes, {jax.device_count()} devices in all")
  loop = make_loop(config, pool, progress, workdir)
  stages = stage_list(config.rounds, loop.spec.fused)
  ckpt = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
  # One process: the pool lives on the mesh for the whole loop (every program follows its params;
  # activations are constrained by the rules under `jax.set_mesh`). Several processes: evaluation
  # stays process-local and only distillation runs on the global mesh.
  mesh = runtime_mesh(config)
  local_mesh = mesh if jax.process_count() == 1 else None
  if local_mesh is not None:
    pool = placed(pool, local_mesh)
  driver = Driver(loop, workdir, mesh, progress)
  stage_fns = STAGE_FNS
  if isinstance(pool, pool_lib.Groups):  # Text between groups, rows and training per group.
    stage_fns = STAGE_FNS | hetero_loop.STAGE_FNS
  st, start = State(pool, {}, [], {}), 0
  with jax.set_mesh(local_mesh) if local_mesh is not None else contextlib.nullcontext():
    try:
      latest = ckpt.latest()
      if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None)), pool.params)
        params, arrays, meta = ckpt.restore(latest, abstract)
        st = State(pool_lib.with_params(pool, params), arrays, meta["history"],
                   meta["distill_stats"])
        start = latest + 1
        logging.info("resuming after round %d stage %s", meta["round"], meta["stage"])
        if primary:
          print(f"Resuming from {workdir / 'checkpoints'}: round {meta['round']} "
                f"{meta['stage']} was the last finished stage.")
      # Every finished stage's wall seconds and their parts, over all sittings (`timings.jsonl`).
      timings = read_timings(workdir)[:start] if primary else []
      for index in range(start, len(stages)):
        r, stage = stages[index]
        loop.round_ = r
        loop.watch.take()
        t0 = time.perf_counter()
        st = stage_fns[stage](driver, st, r)
        seconds = time.perf_counter() - t0
        logging.info("round %d %s: %.1f s", r, stage, seconds)
        ckpt.save(index, st.pool.params, st.arrays, {
            "round": r, "stage": stage, "history": st.history,
            "distill_stats": st.distill_stats, "seed": config.seed,
            "config": json.loads(config.to_json())})
        if primary:
          timings.append({"round": r, "stage": stage, "seconds": seconds,
                          "parts": loop.watch.take()})
          write_timings(workdir, timings)
        if lock is not None:
          lock.heartbeat()
        if stop_after is not None and index == stop_after:
          raise Interrupted(f"stopped after stage {index} (round {r} {stage})")
    finally:
      ckpt.close()
  if primary:
    summary = run_summary(workdir, st.history, st.pool.names, config.strategy, loop.test)
    summary["evaluated_on"] = loop.scored_split
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_paired(summary))
  return st.history
