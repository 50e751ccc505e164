"""The evolution loop on tiny random models and BIG-bench-format rows (tests/conftest.py): one
round per strategy, kill/resume at every stage, bad input, multi-student data never from test, the
dry-run plan."""

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from configs_loader import (check_round_without_training_rows, dry_run_stdout,
                           killed_and_resumed, load_config)

from single_multi import decoding, distill, evolve, fused, pool as pool_lib, report, rows, spec
from single_multi import workdir as wd
from single_multi.data import pipeline, tasks

from test_evaluate import _model

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_pool():
  return pool_lib.from_models([_model(s) for s in range(3)], ["t0", "t1", "t2"])


def _config(**overrides):
  return load_config("tiny.py", **overrides)


# logit_fusion's round (same checks) is the uninterrupted run of the kill/resume test below.
@pytest.mark.parametrize("strategy", ["multiagent_refine", "trained_router"])
def test_one_round_end_to_end_and_distillation_lowers_the_loss(tiny_pool, tmp_path, strategy):
  _check_one_round(tiny_pool, tmp_path, strategy)


def _check_one_round(tiny_pool, tmp_path, strategy, **overrides):
  c = _config(strategy=strategy, **{"distill.epochs": 3.0}, **overrides)
  history = evolve.run(c, tmp_path, tiny_pool, progress=False)
  # summary.json: the composition, the rounds, paired changes on the same rows, collapses.
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["rounds"] == history and sum(summary["composition"].values()) == 8
  paired = summary["paired"]
  assert paired["single_mean"]["n"] == 8 and paired["rounds"] == [0, 1]
  assert paired["single_mean"]["delta"] == pytest.approx(
      history[1]["single_mean"] - history[0]["single_mean"], abs=1e-9)
  assert paired["collab"]["delta"] == pytest.approx(history[1]["collab"] - history[0]["collab"],
                                                    abs=1e-9)
  lo, hi = paired["collab"]["ci95"]
  assert lo <= paired["collab"]["delta"] <= hi
  assert summary["collapse"] == [c for m in history for c in report.collapsed(m)]
  assert [m["round"] for m in history] == [0, 1]
  for m in history:
    assert set(m["singles"]) == {"t0", "t1", "t2"} and 0 <= m["collab"] <= 1
    lo, hi = m["collab_ci95"]
    assert lo <= m["collab"] <= hi
  d = history[1]["distill"]
  # The last epoch's mean loss below the first's (the same rows; one batch against another is not).
  assert all(last < first for first, last in zip(d["first_epoch_loss"], d["last_epoch_loss"])), d
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
  records = (tmp_path / "round_1" / "collaboration" / "records.jsonl").read_text().splitlines()
  assert len(records) == 8 and json.loads(records[0])["model"] == strategy
  # Where the time went: one entry per stage, its parts inside its wall time, summed in summary.
  timings = report.read_timings(tmp_path)
  assert [(t["round"], t["stage"]) for t in timings] == evolve.stage_list(c.rounds,
                                                                           c.fused_round)
  for t in timings:
    assert 0 <= sum(t["parts"].values()) <= t["seconds"], t
  assert {"singles", "collaboration"} <= set(timings[0]["parts"])
  assert summary["seconds"] == report.time_summary(timings)
  assert summary["seconds"]["total"] == pytest.approx(sum(t["seconds"] for t in timings))
  return history


def test_stopwatch_counts_a_part_inside_another_once_and_sums_by_stage_and_part():
  # fit from 0 to 5 with singles from 1 inside (an inner part's end is not read); singles 6-8.
  clock = iter([0.0, 1.0, 5.0, 6.0, 8.0])
  watch = evolve.Stopwatch(clock=lambda: next(clock))
  with watch.part("fit"):
    with watch.part("singles"):
      pass
  with watch.part("singles"):
    pass
  assert watch.take() == {"fit": 5.0, "singles": 2.0} and watch.take() == {}
  timings = [{"round": 0, "stage": "evaluate", "seconds": 10.0, "parts": {"singles": 4.0}},
             {"round": 1, "stage": "distill", "seconds": 6.0, "parts": {}},
             {"round": 1, "stage": "evaluate", "seconds": 9.0,
              "parts": {"singles": 3.0, "fit": 1.0}}]
  assert report.time_summary(timings) == {
      "total": 25.0, "stages": {"evaluate": 19.0, "distill": 6.0},
      "parts": {"singles": 7.0, "rest": 17.0, "fit": 1.0}}


def test_collapse_is_flagged_only_when_the_gold_is_not_as_uniform():
  m = {"round": 2, "top_answer_share": {"m0": 0.95, "m1": 0.5}, "gold_top_share": 0.5}
  assert report.collapsed(m) == [{"round": 2, "model": "m0", "share": 0.95}]
  assert report.collapsed(dict(m, gold_top_share=0.92)) == []  # Gold that uniform: no collapse.
  assert report.top_share(["A", "A", "B", None]) == 0.5 and report.top_share([]) == 0.0


def _event_tags(logdir) -> set[str]:
  """The scalar tags in a TensorBoard event directory, read from its TFRecord files."""
  import struct
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in pathlib.Path(logdir).glob("events.*"):
    data, at = path.read_bytes(), 0
    while at < len(data):  # A record: length (u64), its crc (u32), the event, the event's crc.
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      tags |= {v.tag for v in event.summary.value}
      at += 12 + n + 4
  return tags


def test_a_validation_runs_outputs_name_the_rows_they_scored(tmp_path):
  """evaluate_on="validation" scores held-out dev rows, so the printed paired changes, the
  collapse lines and the TensorBoard tags say "validation", not "test" (the plot's labels take
  the same `split`; the test does not read the image)."""
  m = {"round": 0, "n": 2, "singles": {"a": 0.5}, "singles_ci95": {"a": [0.0, 1.0]},
       "single_mean": 0.5, "best_single": 0.5, "best_single_model": "a", "collab": 0.5,
       "collab_ci95": [0.0, 1.0], "by_task": {"a": {"f": 0.5}}}
  d = {"delta": 0.0, "ci95": [0.0, 0.0], "n": 2}
  summary = {"paired": {"rounds": [0, 1], "single_mean": d, "singles": {"a": d}, "collab": d,
                        "collab_vs_best_single_round0": d, "best_single_round0": "a"},
             "collapse": [{"round": 1, "model": "a", "share": 1.0}]}
  for split in ("test", "validation"):
    text = report.format_paired(dict(summary, evaluated_on=split))
    assert text.startswith(f"paired on the same {split} rows, round 1 vs round 0")
    assert f"gives one answer to 100% of the {split} rows" in text
    (tmp_path / split).mkdir()
    report.write_metrics(tmp_path / split, [m], split)
    assert _event_tags(tmp_path / split / "tensorboard") == {
        f"{split}/collaboration", f"{split}/single_mean", f"{split}/best_single",
        f"{split}/single/a", f"{split}_by_task/f/a"}
  assert report.format_paired(summary).startswith("paired on the same test rows")


def test_round_summary_shows_the_baselines_as_every_report_does():
  """The round print names chance / majority / position with evaluate's one formatter."""
  from single_multi import evaluate
  base = {"generation": {"rows": 3, "chance": 0.0, "majority_answer": {"answer": "x", "rate": 0.3}},
          "mc_rows": 4, "chance": 0.25, "majority_class": {"letter": "B", "rate": 0.75},
          "position": {"letter": "B", "accuracy": 0.5}, "position_from": "dev"}
  m = {"round": 0, "n": 7, "singles": {"a": 0.5}, "singles_ci95": {"a": [0.4, 0.6]},
       "single_mean": 0.5, "best_single": 0.5, "best_single_model": "a", "collab": 0.6,
       "collab_ci95": [0.5, 0.7], "baselines": base, "answer_positions": {"a": {"A": 0.5}}}
  text = report.format_round(m).splitlines()
  assert [line.strip() for line in text[2:4]] == evaluate.baseline_lines(base)
  assert "chance 0.250" in text[3] and "majority answer 0.300 ('x')" in text[2]
  assert text[4].split() == ["a", "answers", "A", "50%"]


def test_every_refusal_names_the_alternatives_and_loads_nothing(monkeypatch):
  """Every (strategy, distillation method, fused_round) the loop cannot run is refused by
  `validate` before any model loads, with a message that says what to use instead."""
  from single_multi import collab, distill, pools
  from single_multi.models import loading
  monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("validate loaded a model"))
  monkeypatch.setattr(pools, "build", lambda *a, **k: pytest.fail("validate built the pool"))
  refused = {}
  for name in collab.REGISTRY:
    for method in distill.METHODS:
      for one_program in (False, True):
        try:
          evolve.validate(_config(strategy=name, fused_round=one_program,
                                  **{"distill.method": method}))
        except evolve.ConfigError as e:
          refused[name, method, one_program] = str(e)
  for combo, message in refused.items():
    assert re.search(r"\buse\b|\bset\b|\bgive\b", message), (combo, message)
  assert ("co_llm", "on_policy_kd", False) in refused  # No per-token combine: refused up front.
  assert ("multiagent_refine", "logit_kd", False) in refused
  assert ("multiagent_finetuning", "supervised_kd", True) in refused
  assert ("dare_ties", "supervised_kd", False) in refused  # No merge base.
  assert ("logit_fusion", "on_policy_kd", True) not in refused


def test_the_rows_table_has_one_row_per_distillation_method():
  """Every method distill.py has a loss for has its rows built by one table entry, used by both
  round modes; the entry's flags agree with what the loss reads."""
  from single_multi import distill
  assert list(rows.METHODS) == list(distill.METHODS)
  for name, m in rows.METHODS.items():
    assert callable(m.host) and callable(m.traced), name
    assert m.teacher == (name in ("logit_kd", "on_policy_kd")), name  # The KL losses.
    assert m.eos_tail == (not m.teacher), name  # NLL rows end in eos; teacher rows do not.
  with pytest.raises(ValueError, match="choose one of"):
    rows.method("reverse_kd")


def test_a_method_the_round_program_cannot_build_is_refused_under_fused_round(monkeypatch):
  """A method whose rows exist only on the host (`traced=None`) runs staged and is refused with
  fused_round by `validate`, naming the methods that can run fused."""
  import dataclasses
  monkeypatch.setitem(rows.METHODS, "multi_student_kd",
                      dataclasses.replace(rows.METHODS["multi_student_kd"], traced=None))
  c = _config(**{"distill.method": "multi_student_kd"})
  evolve.validate(c)
  with pytest.raises(evolve.ConfigError, match=r"fused_round=False.*'supervised_kd'"):
    evolve.validate(_config(fused_round=True, **{"distill.method": "multi_student_kd"}))


def test_task_vector_merge_in_the_loop_uses_the_fixed_merge_base(tiny_pool, tmp_path,
                                                                 monkeypatch):
  """dare_ties in the loop: every fit merges against config.merge_base, the same params each
  time, although the members change."""
  from single_multi.models import loading
  base = _model(5)
  loading.save_hf(tmp_path / "base", base.config, base.params)
  seen = []
  real = evolve.collab.fit

  def spy(pool, name, dev, **kw):
    seen.append((kw.get("base"), pool.params))
    return real(pool, name, dev, **kw)

  monkeypatch.setattr(evolve.collab, "fit", spy)
  c = _config(strategy="dare_ties", merge_base=str(tmp_path / "base"))
  history = evolve.run(c, tmp_path / "run", tiny_pool, progress=False)
  # Fits: round 0's test, round 1's dev collaboration, round 1's test (distilled members).
  assert [m["round"] for m in history] == [0, 1] and len(seen) == 3
  for got, _ in seen:
    jax.tree.map(np.testing.assert_array_equal, got, base.params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seen[0][1]),
                                                      jax.tree.leaves(seen[-1][1])))


@pytest.mark.parametrize("method", ["logit_kd", "on_policy_kd"])
def test_logit_and_on_policy_kd_rounds_train_on_normalised_teacher_rows(tiny_pool, tmp_path,
                                                                        monkeypatch, method):
  # The KL to the fused teacher starts small (~0.07): Adam at the NLL tests' 1e-2 overshoots it.
  c = _config(**{"distill.method": method, "distill.epochs": 3.0,
                 "distill.learning_rate": 1e-3})
  seen = {}
  real = evolve.distill.distill

  def spy(params, data, *args, **kwargs):
    out = real(params, data, *args, **kwargs)
    seen.update(data, before=params, after=out[0], per_model=kwargs.get("per_model_batch"))
    return out

  monkeypatch.setattr(evolve.distill, "distill", spy)
  history = evolve.run(c, tmp_path, tiny_pool, progress=False)
  assert [m["round"] for m in history] == [0, 1] and history[1]["distill"]["steps"] == 6
  teacher, tokens = np.asarray(seen["teacher"]), np.asarray(seen["tokens"])
  # logit_kd: one set of rows (the collaboration's own outputs) for every model; on_policy_kd:
  # per model, its own samples, [N, R, ...].
  assert seen["per_model"] == (method == "on_policy_kd")
  lead = (3, 8) if method == "on_policy_kd" else (8,)
  assert tokens.shape[:len(lead)] == lead and teacher.shape[:len(lead)] == lead
  assert teacher.shape[-2:] == (c.max_new_tokens, tiny_pool.config.vocab_size)
  # Every teacher row the loss uses is a distribution over the vocabulary.
  loss_mask = np.asarray(seen["loss_mask"])[..., -c.max_new_tokens:] > 0
  mass = np.exp(teacher.astype(np.float64)).sum(-1)
  assert loss_mask.any() and np.allclose(mass[loss_mask], 1.0, atol=1e-4)
  # The KL over all the round's rows drops for every model (merged params after vs before).
  loss_fn = evolve.distill.make_loss(tiny_pool.config, method, None)
  data = {k: seen[k] for k in ("tokens", "mask", "loss_mask", "teacher")}
  one = lambda p, d: loss_fn(p, None, d, jax.random.key(0))[0]
  total = jax.vmap(one, in_axes=(0, 0 if seen["per_model"] else None))
  before, after = np.asarray(total(seen["before"], data)), np.asarray(total(seen["after"], data))
  assert (after < before).all(), (before, after)


def test_kill_after_each_stage_then_resume_gives_the_same_metrics(tiny_pool, tmp_path):
  """Also logit_fusion's one round end to end (the distillation loss drops for every model)."""
  c = _config(**{"distill.epochs": 3.0})
  want = _check_one_round(tiny_pool, tmp_path / "whole", "logit_fusion")
  stages = evolve.stage_list(c.rounds)
  for k, workdir, got in killed_and_resumed(c, tiny_pool, tmp_path):
    assert got == want, f"resumed after stage {k} ({stages[k]})"
    # Each stage's time once: the killed sitting's finished stages, then the resumed ones.
    assert [(t["round"], t["stage"]) for t in report.read_timings(workdir)] == stages


def test_a_round_with_stacked_layers_equals_the_cpu_default(tiny_pool, tmp_path, monkeypatch):
  """Decoding on GPU/TPU keeps the layers stacked (`decoding.unstack_for_loop`), CPU unstacks
  them, so the tests take CPU's path unless told: the same round with stacked layers gives the
  same history, its shared prompt heads prefilled (a stacked cache broadcast to the rows: the
  members' decoding and the router's features)."""
  strategy = "trained_router"
  from single_multi.models import transformer
  want = _check_one_round(tiny_pool, tmp_path / "unstacked", strategy)
  stacked_for_loop = decoding.unstack_for_loop
  monkeypatch.setattr(decoding, "unstack_for_loop",
                      lambda params, unstack, layer_axis=0: stacked_for_loop(
                          params, False if unstack is None else unstack, layer_axis))
  heads = []
  broadcast_rows = transformer.broadcast_rows
  monkeypatch.setattr(transformer, "broadcast_rows",
                      lambda cache, *a, **k: heads.append(cache["k"]) or broadcast_rows(
                          cache, *a, **k))
  jax.clear_caches()  # Trace again: the programs above were traced with unstacked layers.
  try:
    got = _check_one_round(tiny_pool, tmp_path / "stacked", strategy)
  finally:
    jax.clear_caches()
  assert heads and not any(isinstance(k, list) for k in heads)  # Stacked heads were prefilled.
  assert got == want


def test_bad_input_fails_clearly(tiny_pool, tmp_path):
  with pytest.raises(Exception, match="unknown strategy 'nope'"):
    evolve.validate(_config(strategy="nope"))
  with pytest.raises(ValueError, match="unknown distillation method 'sft'"):
    evolve.validate(_config(**{"distill.method": "sft"}))
  with pytest.raises(ValueError, match="has no field"):
    c = _config()
    c.strategy_config.unknown_knob = 3
    evolve.validate(c)
  with pytest.raises(ValueError, match="per-token teacher rows"):
    evolve.validate(_config(strategy="multiagent_refine", **{"distill.method": "logit_kd"}))
  with pytest.raises(ValueError, match="fused_round: the correctness filter"):
    evolve.validate(_config(fused_round=True, **{"distill.correctness_filter": True}))
  from single_multi import main
  with pytest.raises(ValueError, match="unknown job 'evolv'"):
    main.run(_config(job="evolv"))
  # Ranges, task names and pool sizes, all before anything loads; each names field and value.
  for overrides, message in [
      ({"batch_size": -4}, "batch_size=-4 is not allowed: give an integer >= 1"),
      ({"max_new_tokens": 0}, "max_new_tokens=0 is not allowed"),
      ({"test_examples": 0}, "test_examples=0 is not allowed"),
      ({"dev_examples": 0}, "dev_examples=0 is not allowed"),
      ({"temperature": -1.0}, "temperature=-1.0 is not allowed: give a finite number >= 0"),
      ({"temperature": float("nan")}, "temperature=nan is not allowed"),
      ({"top_p": 0.0}, "top_p=0.0 is not allowed: give a number in (0, 1]"),
      ({"distill.batch_size": 0}, "distill.batch_size=0 is not allowed"),
      ({"distill.epochs": 0.0}, "distill.epochs=0.0 is not allowed"),
      ({"distill.learning_rate": -1e-4}, "distill.learning_rate=-0.0001 is not allowed"),
      ({"task": "moco:gsm9k"}, "unknown MoCo task 'gsm9k'"),
      ({"specialists": ("bigbench:",)}, "names no BIG-bench task"),
      ({"pool": ("tiny:0",), "strategy": "logit_fusion"},
       "strategy='logit_fusion' needs at least 2 models; the pool will have 1"),
      ({"pool": ("tiny:0",), "specialists": ("gsm8k",), "strategy": "logit_fusion"},
       "the pool will have 1 (one per specialist)"),
      ({"strategy": "dare_ties"}, "merges task vectors (member - base) and the base is unknown"),
      ({"strategy": "multiagent_finetuning", "fused_round": True},
       "fused_round: multiagent_finetuning votes on answers extracted from text on the host"),
  ]:
    with pytest.raises(evolve.ConfigError, match=re.escape(message)):
      evolve.validate(_config(**overrides))
  # A damaged checkpoint: a clear error naming the directory.
  c = _config()
  with pytest.raises(evolve.Interrupted):
    evolve.run(c, tmp_path / "run", tiny_pool, progress=False, stop_after=0)
  for f in (tmp_path / "run" / "checkpoints" / "0" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(wd.CheckpointError, match="cannot restore checkpoint 0"):
    evolve.run(c, tmp_path / "run", tiny_pool, progress=False)
  # Damage that stays readable (one weight changed, the files rewritten in Orbax's format): the
  # restore names the damaged leaf instead of loading it. (Flipping raw bytes is not a stable
  # test of this: the chunks are compressed, so a flip may also make them unreadable, the case
  # above, depending on where Orbax laid out the leaves.)
  import shutil
  import orbax.checkpoint as ocp
  with pytest.raises(evolve.Interrupted):
    evolve.run(c, tmp_path / "flipped", tiny_pool, progress=False, stop_after=0)
  params_dir = tmp_path / "flipped" / "checkpoints" / "0" / "params"
  with ocp.StandardCheckpointer() as checkpointer:
    saved = jax.tree.map(np.array, checkpointer.restore(params_dir))
    saved["layers"]["k"][0, 0, 0, 0, 0] += 1.0
    shutil.rmtree(params_dir)
    checkpointer.save(params_dir, saved)
  with pytest.raises(wd.CheckpointError,
                     match=r"params \['layers'\]\['k'\] differ from the fingerprints saved"):
    evolve.run(c, tmp_path / "flipped", tiny_pool, progress=False)
  # A partial (uncommitted) save is ignored: the run starts over from the start.
  partial = tmp_path / "partial" / "checkpoints" / "3.orbax-checkpoint-tmp-123"
  partial.mkdir(parents=True)
  history = evolve.run(_config(rounds=0), tmp_path / "partial", tiny_pool, progress=False)
  assert [m["round"] for m in history] == [0]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_pool,
                                                                             tmp_path):
  # A finite learning rate (validation refuses NaN) so large that the first update overflows the
  # weights: the second step's loss is not finite.
  c = _config(**{"distill.learning_rate": 1e38, "distill.warmup_fraction": 0.0})
  with pytest.raises(FloatingPointError, match="distillation loss"):
    evolve.run(c, tmp_path, tiny_pool, progress=False)
  ckpt = wd.Checkpoints(tmp_path / "checkpoints", 2)
  assert ckpt.latest() == 1  # round 1 "collaborate" finished; "distill" never saved.
  ckpt.close()


@pytest.mark.parametrize("where", ["save", "wait_until_finished"])
def test_a_failed_checkpoint_write_is_one_clear_error_and_resumes(tiny_pool, tmp_path,
                                                                   monkeypatch, where):
  """Orbax's write of the second stage fails, at its start with ENOSPC (an OSError), or in the
  writer thread: tensorstore's ValueError (RESOURCE_EXHAUSTED on a full disk), re-raised from
  Orbax's wait there and again when the manager closes. The run stops with one CheckpointError
  naming the step and the way out (not the raw error, nor a second one raised over it while
  closing); the same command then resumes and finishes."""
  import errno

  import orbax.checkpoint as ocp
  real = getattr(ocp.CheckpointManager, where)

  def full(self, step, *args, **kwargs):
    if step == 1:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, step, *args, **kwargs)

  def writer_failed(self):
    real(self)
    if self.latest_step() == 1:
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on device")

  monkeypatch.setattr(ocp.CheckpointManager, where, full if where == "save" else writer_failed)
  c = _config()
  error = "" if where == "save" else "ValueError: RESOURCE_EXHAUSTED.*"
  with pytest.raises(wd.CheckpointError, match=rf"cannot write checkpoint 1 .*{error}No space "
                                               r"left on device.*rerun the same command"):
    evolve.run(c, tmp_path, tiny_pool, progress=False)
  monkeypatch.setattr(ocp.CheckpointManager, where, real)
  history = evolve.run(c, tmp_path, tiny_pool, progress=False)
  assert [m["round"] for m in history] == [0, 1]


def test_on_cpu_a_save_is_written_before_the_loop_goes_on(tmp_path):
  """On CPU an asynchronous save's host copy of the params would share memory with the next
  stage: `Checkpoints.save` returns only once the step is committed."""
  ckpt = wd.Checkpoints(tmp_path / "checkpoints", 2)
  assert ckpt.wait == (jax.default_backend() == "cpu")
  params = {"w": np.arange(1 << 20, dtype=np.float32)}
  ckpt.save(0, params, {}, {"round": 0, "stage": "evaluate"})
  assert not ckpt.manager.is_saving_in_progress() and ckpt.latest() == 0
  assert not list((tmp_path / "checkpoints").glob("*tmp*"))
  restored, _, meta = ckpt.restore(0, jax.tree.map(np.zeros_like, params))
  np.testing.assert_array_equal(restored["w"], params["w"])
  ckpt.close()


@pytest.mark.parametrize("fused", [False, True])
def test_finite_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_pool, tmp_path, fused):
  """lr 1e6: finite losses, but the weights blow up (the reported case: every loss ln(V),
  weights at ~1e13, no answer left). The round stops before saving, naming the learning rate."""
  c = _config(fused_round=fused, **{"distill.learning_rate": 1e6})
  with pytest.raises(evolve.distill.Diverged, match=r"diverged .*weight norm.*learning_rate "
                                                     r"\(now 1e\+06\)"):
    evolve.run(c, tmp_path, tiny_pool, progress=False)
  ckpt = wd.Checkpoints(tmp_path / "checkpoints", 2)
  assert ckpt.latest() == (0 if fused else 1)  # Nothing saved after the last good stage.
  ckpt.close()
  # The guard's rules by hand: a loss that climbs to near uniform, and a 10-fold weight growth.
  ok = np.asarray([1.0, 1.0])
  evolve.distill.check_converging(np.asarray([[2.0, 2.0], [1.0, 1.5]]), ok, ok * 9, 260, 1e-4)
  with pytest.raises(evolve.distill.Diverged, match="model 1"):
    evolve.distill.check_converging(np.asarray([[2.0, 2.0], [1.0, 5.1]]), ok, ok, 260, 1e-4)
  with pytest.raises(evolve.distill.Diverged, match="model 0"):
    evolve.distill.check_converging(np.asarray([[2.0], [1.0]]), ok[:1], ok[:1] * 11, 260, 1e-4)


def test_multi_student_kd_trains_only_on_dev_prompts(tiny_pool, tmp_path, monkeypatch):
  c = _config(**{"distill.method": "multi_student_kd"})
  seen = {}
  real = evolve.distill.distill

  def spy(params, data, *args, **kwargs):
    seen.update(data)
    return real(params, data, *args, **kwargs)

  monkeypatch.setattr(evolve.distill, "distill", spy)
  evolve.run(c, tmp_path, tiny_pool, progress=False)
  task = tasks.load_task(c.task)
  tok = tiny_pool.tokenizer
  texts = {tok.decode([t for t, m in zip(row, mask) if m]) for model in range(3)
           for row, mask in zip(seen["tokens"][model], seen["mask"][model])}
  test_questions = [e.question for e in task.test]
  dev_questions = [e.question for e in task.dev]
  assert seen["tokens"].shape[0] == 3  # A set of rows per model.
  assert not any(q in t for q in test_questions for t in texts)
  assert all(any(q in t for q in dev_questions) for t in texts)


def test_dry_run_plans_the_paper_pool_on_8_devices():
  # configs/paper.py: configs/mmlu.py's pool and mesh on the paper's task files.
  out = dry_run_stdout("paper.py")
  assert "3 x qwen2 (hidden 3584, 28 layers, vocab 152064)" in out and "8 devices" in out
  line = out.split("bytes per device: ")[1].splitlines()[0]
  per_device = [float(x.split()[0]) for x in line.split(": ")[1:]]
  assert len(per_device) == 8
  # 3 x 7.6B bf16 params over 8 devices: about 5.3 GiB each, plus LoRA and AdamW states.
  assert all(5.0 < v < 6.5 for v in per_device), per_device
  replicated = out.split("replicated leaves: ")[1]
  assert "0 of them >= 1 MiB" in replicated
  assert "params['embed']" in out and "opt_state" in out


# -------------------------------------------------------------------------------------------------
# One round as one program (config.fused_round).


def test_rows_with_eos_by_hand():
  prompt = np.asarray([[0, 7, 8], [9, 9, 9]])
  prompt_mask = (prompt > 0).astype(np.int32)
  tokens = np.asarray([[5, 1, 0], [5, 6, 7]])  # Row 0 stopped (1 = stop id); row 1 was cut off.
  built, mask, loss = rows.rows_with_eos(prompt, prompt_mask, tokens, np.asarray([2, 3]),
                                         (1, 3), eos=3)
  np.testing.assert_array_equal(built, [[0, 7, 8, 5, 3, 0, 0], [9, 9, 9, 5, 6, 7, 3]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(loss, [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]])


def test_fused_round_program_equals_its_parts_run_as_separate_programs(tiny_pool):
  """collaborate -> rows -> distill -> decode in one jit == the same steps as the staged loop's
  separate programs (collab.run, distill.distill, pool decode) on the program's own rows."""
  from single_multi import collab, decoding, distill
  from single_multi.data import pipeline

  c = _config(**{"distill.epochs": 2.0})
  task = tasks.load_task(c.task)
  dev, test = task.dev[:8], task.test[:8]
  prompter = pipeline.Prompter(tiny_pool.tokenizer)
  dcfg, cfg = spec.distill_config(c), spec.strategy_config(c)
  env = collab.make_env(tiny_pool, c.strategy, cfg, max_new_tokens=c.max_new_tokens)
  dev_b = collab.batch_from(next(iter(pipeline.generation_batches(dev, prompter, batch_size=8))))
  test_b = collab.batch_from(next(iter(pipeline.generation_batches(test, prompter,
                                                                   batch_size=8))))
  order = distill.step_order(8, dcfg)
  keys = {k: jax.random.split(jax.random.key(i), 8) for i, k in enumerate(
      ("dev_collab", "policy", "test_singles", "test_collab"))}
  res = fused.round_program(tiny_pool.params, dev_b, test_b, order, keys, None,
                             strategy=c.strategy, cfg=cfg, env=env, dcfg=dcfg, eos=1,
                             evaluate_test=True)
  k_dev, k_single, k_test = keys["dev_collab"], keys["test_singles"], keys["test_collab"]
  out = collab.run(tiny_pool, c.strategy, dev_b, env=env, cfg=cfg, rng=k_dev)
  np.testing.assert_array_equal(res["dev"][0], out.tokens)
  data = {k: np.asarray(v) for k, v in res["data"].items()}
  P = dev_b.prompt.shape[1]  # Each row: the prompt, the output as generated, then eos (= 1).
  for b in range(8):
    gen = [int(t) for t in np.asarray(out.tokens)[b, :int(out.lengths[b])]]
    want = (gen[:-1] if gen and gen[-1] == 1 else gen) + [1]
    assert data["tokens"][b, P:P + len(want)].tolist() == want
    assert data["loss_mask"][b].sum() == len(want) and data["loss_mask"][b, P:P + len(want)].all()
  params, _, hist = distill.distill(tiny_pool.params, data, tiny_pool.config, dcfg,
                                    progress=False)
  assert len(hist) == len(order)
  np.testing.assert_allclose(np.asarray(res["losses"]), [h["loss"] for h in hist], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(res["params"]), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  singles = pool_lib.decode_each(res["params"], test_b.prompt, test_b.prompt_mask, k_single,
                                 **env.decode_kw)
  np.testing.assert_array_equal(res["singles"][0], singles.tokens)
  distilled = pool_lib.Pool(tiny_pool.config, res["params"], tiny_pool.names, tiny_pool.tokenizer)
  together = collab.run(distilled, c.strategy, test_b, env=env, cfg=cfg, rng=k_test)
  np.testing.assert_array_equal(res["collab"][0], together.tokens)
  assert decoding.stop_ids_for(tiny_pool.config, tiny_pool.tokenizer)[0] == 1


def test_fused_on_policy_round_trains_each_model_on_its_own_scored_samples(tiny_pool):
  """on_policy_kd in one program: every model's dev samples == the pool decode with the same key,
  their teacher rows == the collaboration's teacher-forced scoring of them (normalised), and the
  per-model distillation == distill.distill on those rows."""
  from single_multi import collab, distill
  from single_multi.collab import token_level
  from single_multi.data import pipeline

  c = _config(strategy="logit_fusion", **{"distill.method": "on_policy_kd",
                                          "distill.learning_rate": 1e-3})
  task = tasks.load_task(c.task)
  prompter = pipeline.Prompter(tiny_pool.tokenizer)
  dcfg, cfg = spec.distill_config(c), spec.strategy_config(c)
  env = collab.make_env(tiny_pool, c.strategy, cfg, max_new_tokens=c.max_new_tokens)
  dev_b, test_b = (collab.batch_from(next(iter(pipeline.generation_batches(
      split[:8], prompter, batch_size=8)))) for split in (task.dev, task.test))
  order = distill.step_order(8, dcfg)
  keys = {k: jax.random.split(jax.random.key(i), 8) for i, k in enumerate(
      ("dev_collab", "policy", "test_singles", "test_collab"))}
  res = fused.round_program(tiny_pool.params, dev_b, test_b, order, keys, None,
                             strategy=c.strategy, cfg=cfg, env=env, dcfg=dcfg, eos=1,
                             evaluate_test=False, policy_sampler=spec.policy_sampler(c))
  data = {k: np.asarray(v) for k, v in res["data"].items()}
  assert data["tokens"].shape[:2] == (3, 8) and data["teacher"].shape[:2] == (3, 8)
  sample = pool_lib.decode_each(tiny_pool.params, dev_b.prompt, dev_b.prompt_mask,
                                keys["policy"], sampler=spec.policy_sampler(c),
                                **env.decode_kw)
  combine = token_level.combine_for(c.strategy, cfg)
  for i in range(3):
    tokens, mask, loss_mask = distill.sequences(dev_b.prompt, dev_b.prompt_mask,
                                                sample.tokens[i], sample.lengths[i])
    np.testing.assert_array_equal(data["tokens"][i], tokens)
    np.testing.assert_array_equal(data["loss_mask"][i], loss_mask)
    teacher = token_level.teacher_forced_rows(tiny_pool.params, tokens, mask, env.max_new_tokens,
                                              combine, env)
    np.testing.assert_allclose(data["teacher"][i], teacher, atol=1e-5)
  live = data["loss_mask"][:, :, -c.max_new_tokens:] > 0
  sums = np.exp(data["teacher"]).sum(-1)
  np.testing.assert_allclose(sums[live], 1.0, atol=1e-4)
  _, _, hist = distill.distill(tiny_pool.params, data, tiny_pool.config, dcfg,
                               per_model_batch=True, progress=False)
  np.testing.assert_allclose(np.asarray(res["losses"]), [h["loss"] for h in hist], rtol=2e-5)


@pytest.mark.parametrize("method,temperature", [("logit_kd", 0.0), ("logit_kd", 0.7),
                                                ("supervised_kd", 0.7),
                                                ("multi_student_kd", 0.7)])
def test_fused_loop_equals_the_staged_loop_and_resumes(tiny_pool, tmp_path, method,
                                                       temperature):
  """Each method's staged rows are the program's rows (one `rows.METHODS` entry; the answers'
  tokens exactly as generated, not their text re-tokenised) and every decode samples with the
  config's sampler and the same per-row keys (seed, round, purpose, example id): the fused loop
  reproduces the staged loop's metrics and records, greedy and at temperature 0.7 / top-p 0.9;
  killed after round 0, it resumes to the same history."""
  c = _config(temperature=temperature, top_p=0.9,
              **{"distill.method": method, "distill.learning_rate": 1e-3})
  staged = evolve.run(c, tmp_path / "staged", tiny_pool, progress=False)
  c.fused_round = True
  fused = evolve.run(c, tmp_path / "fused", tiny_pool, progress=False)
  steps = 4 if method == "multi_student_kd" else 2  # 2R rows: the collaboration's, then own.
  assert [m["round"] for m in fused] == [0, 1] and fused[1]["distill"]["steps"] == steps
  for a, b in zip(staged, fused):
    da, db = a.pop("distill", None), b.pop("distill", None)
    assert a == b
    if da:
      for k in ("first_loss", "last_loss", "first_epoch_loss", "last_epoch_loss"):
        assert da[k] == pytest.approx(db[k], rel=1e-4)
  assert (tmp_path / "fused" / "round_1" / "collaboration_dev" / "records.jsonl").exists()
  for part in ("singles", "collaboration"):
    got = (tmp_path / "fused" / "round_1" / part / "records.jsonl").read_text()
    assert got == (tmp_path / "staged" / "round_1" / part / "records.jsonl").read_text(), part
  with pytest.raises(evolve.Interrupted):
    evolve.run(c, tmp_path / "killed", tiny_pool, progress=False, stop_after=0)
  resumed = evolve.run(c, tmp_path / "killed", tiny_pool, progress=False)
  for m in resumed:
    m.pop("distill", None)
  assert resumed == fused


def test_samples_do_not_depend_on_the_batching(tiny_pool, tmp_path):
  """At temperature 0.7 the round-0 answers are the same in batches of 8 and of 3 (each row
  samples with its own key), and they are samples: not the greedy answers."""
  def round0(name, **overrides):
    c = _config(**overrides)
    with pytest.raises(evolve.Interrupted):
      evolve.run(c, tmp_path / name, tiny_pool, progress=False, stop_after=0)
    return [(tmp_path / name / "round_0" / part / "records.jsonl").read_text()
            for part in ("singles", "collaboration")]

  sampled = round0("b8", temperature=0.7, top_p=0.9)
  assert round0("b3", temperature=0.7, top_p=0.9, batch_size=3) == sampled
  assert round0("greedy") != sampled


def test_fused_multi_student_round_trains_on_dev_answers_only(tiny_pool, tmp_path, monkeypatch):
  """multi_student_kd in one program after the singles' dev answers are scored: each model's rows
  are the collaboration's, then per dev row its own answer or the best student's (best by the dev
  scores), every prompt a dev prompt."""
  c = _config(fused_round=True, **{"distill.method": "multi_student_kd"})
  seen = {}
  real = fused.round_program

  def spy(params, dev, test, order, rng, state, students, **kw):
    seen.update(dev=dev, test=test, students=students, order=order)
    seen["res"] = real(params, dev, test, order, rng, state, students, **kw)
    return seen["res"]

  monkeypatch.setattr(fused, "round_program", spy)
  history = evolve.run(c, tmp_path, tiny_pool, progress=False)
  assert [m["round"] for m in history] == [0, 1]
  s_tokens, s_lengths, best, own = (np.asarray(x) for x in seen["students"])
  records = [json.loads(x) for x in
             (tmp_path / "round_1" / "singles_dev" / "records.jsonl").read_text().splitlines()]
  mean = {n: np.mean([r["score"] for r in records if r["model"] == n]) for n in tiny_pool.names}
  assert int(best) == int(np.argmax([mean[n] for n in tiny_pool.names]))
  data = {k: np.asarray(v) for k, v in seen["res"]["data"].items()}
  R, P = 8, np.asarray(seen["dev"].prompt).shape[1]
  assert data["tokens"].shape[:2] == (3, 2 * R) and seen["order"].size >= 2 * R
  dev_prompts = np.asarray(seen["dev"].prompt)
  test_prompts = {tuple(p[m > 0]) for p, m in zip(np.asarray(seen["test"].prompt),
                                                  np.asarray(seen["test"].prompt_mask))}
  for i in range(3):
    np.testing.assert_array_equal(data["tokens"][i, :, :P], np.tile(dev_prompts, (2, 1)))
    for r in range(R):
      row = data["tokens"][i, R + r]
      assert tuple(row[:P][data["mask"][i, R + r, :P] > 0]) not in test_prompts
      src = i if own[r] else int(best)
      gen = [int(t) for t in s_tokens[src, r, :s_lengths[src, r]]]
      want = (gen[:-1] if gen and gen[-1] == 1 else gen) + [1]  # The answer, ending in eos.
      assert row[P:P + len(want)].tolist() == want, (i, r)
  assert 0 < own.sum() < R  # Both halves are present.
  # own[r] belongs to the example in batch row r (the batch is sorted, not in dev order): it is
  # that example's seeded half, as in the staged rows. Each row's question is in its last turn.
  from single_multi.data import common
  inputs = {}
  for rec in records:
    inputs.setdefault(rec["input"], set()).add(rec["id"])
  matched = 0
  for r in range(R):
    prompt = tiny_pool.tokenizer.decode(dev_prompts[r]).rsplit("<user>", 1)[-1]
    ids = set().union(*(v for k, v in inputs.items() if k in prompt))
    if len(ids) == 1:
      assert bool(own[r]) == (common.split_fraction(ids.pop(), c.seed) < 0.5), r
      matched += 1
  assert matched >= R // 2, matched
  d = history[1]["distill"]
  assert all(np.isfinite(d["last_loss"]))


def test_fused_round_with_a_dev_fitted_strategy_refits_then_tests(tiny_pool, tmp_path):
  """trained_router learns on dev: its fused round is the collaborate + distill program, a host
  refit with the distilled models, then the test decodes (two programs)."""
  history = _check_one_round(tiny_pool, tmp_path, "trained_router", fused_round=True)
  assert history[1]["distill"]["steps"] == 6


def test_specialist_cache_key_covers_base_task_and_recipe(tmp_path):
  from single_multi import pools
  c = _config(pool=("tiny:0",))
  key = pools.specialist_key(c, "gsm8k")
  assert key == pools.specialist_key(_config(pool=("tiny:0",)), "gsm8k")  # Deterministic.
  changed = [pools.specialist_key(c, "bbh"), pools.specialist_key(_config(pool=("tiny:1",)), "gsm8k")]
  for field, value in [("specialist_steps", 7), ("specialist_examples", 9), ("seed", 3),
                       ("task", "bbh"), ("dev_examples", 5),
                       ("specialist_learning_rate", 1e-3), ("dtype", "bfloat16")]:
    changed.append(pools.specialist_key(_config(pool=("tiny:0",), **{field: value}), "gsm8k"))
  base = tmp_path / "base"  # A local base whose file changes is a new base.
  base.mkdir()
  (base / "model.safetensors").write_bytes(b"1234")
  first = pools.specialist_key(_config(pool=(str(base),)), "gsm8k")
  (base / "model.safetensors").write_bytes(b"12345")
  changed += [first, pools.specialist_key(_config(pool=(str(base),)), "gsm8k")]
  assert len(set(changed + [key])) == len(changed) + 1


def test_workdir_records_its_config_and_refuses_another(tmp_path):
  c = _config()
  assert wd.check_workdir_config(c, tmp_path) == []
  assert json.loads((tmp_path / "config.json").read_text())["pool"] == list(c.pool)
  assert wd.check_workdir_config(_config(keep_checkpoints=5), tmp_path) == []  # Not results.
  with pytest.raises(evolve.ConfigError, match=re.escape(
      "changed: pool: ['tiny:0', 'tiny:1', 'tiny:2'] -> ['tiny:5', 'tiny:6', 'tiny:7']")):
    wd.check_workdir_config(_config(pool=("tiny:5", "tiny:6", "tiny:7")), tmp_path)
  with pytest.raises(evolve.ConfigError, match=re.escape(
      "distill.learning_rate: 0.01 -> 0.001; rounds: 1 -> 3. Resume with the saved config or use "
      "a new --workdir; or allow them: --config.resume_allow=")):
    wd.check_workdir_config(_config(rounds=3, **{"distill.learning_rate": 1e-3}), tmp_path)
  with pytest.raises(evolve.ConfigError, match="fused_round cannot change under a run"):
    wd.check_workdir_config(_config(fused_round=True, resume_allow=("fused_round",)), tmp_path)
  # An allowed change (extending the run) is accepted and becomes the record.
  assert wd.check_workdir_config(_config(rounds=3, resume_allow=("rounds",)),
                                 tmp_path) == ["rounds"]
  assert json.loads((tmp_path / "config.json").read_text())["rounds"] == 3


def test_workdir_lock_refuses_a_live_holder_and_takes_over_a_gone_one(tiny_pool, tmp_path):
  import socket
  import time
  lock_file = tmp_path / "LOCK"
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    lock_file.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                     "started": time.time(), "heartbeat": time.time()}))
    with pytest.raises(wd.WorkdirLockedError, match=f"in use by pid {holder.pid} on "):
      evolve.run(_config(), tmp_path, tiny_pool, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK"]  # Nothing else written.
  finally:
    holder.kill()
    holder.wait()
  with wd.WorkdirLock(tmp_path):  # Its holder is gone: taken over.
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with wd.WorkdirLock(tmp_path):  # Re-entrant in the holding process.
      pass
    assert lock_file.exists()
  assert not lock_file.exists()  # Released.
  # Another host: its heartbeat decides (a bucket workdir shared by machines).
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time(),
                                   "heartbeat": time.time()}))
  with pytest.raises(wd.WorkdirLockedError, match="in use by pid 1 on elsewhere"):
    with wd.WorkdirLock(tmp_path):
      pass
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0.0,
                                   "heartbeat": time.time() - 7200}))
  with wd.WorkdirLock(tmp_path):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()


class _FakeTask:
  """A task with the given dev rows and test rows (for the row-selection tests)."""
  spec = tasks.TaskSpec("bigbench", None, "dev", "test", "dev", "exact_match")

  def __init__(self, rows, test):
    self.dev, self.test = rows, test

  def examples(self, split):
    return self.test if split == "test" else self.dev


def test_specialist_rows_never_meet_the_loops_dev_or_test_rows(monkeypatch):
  """A specialist trains on its family's dev rows minus the loop's dev selection and minus any
  question the loop tests (normalised text), in a seeded order independent of the file order."""
  from single_multi import pools
  from single_multi.data import common, tasks

  def ex(i, q):
    return common.Example(f"f/{i}", "f", q, targets=("x",))
  dev = [ex(i, f"question {i}") for i in range(20)] + [ex(20, "  THE Test question ")]
  test = [ex(100, "the test question"), ex(101, "question 100")]

  Fake = functools.partial(_FakeTask, test=test)
  order = {"loop": dev, "spec": list(reversed(dev))}
  monkeypatch.setattr(tasks, "from_config",
                      lambda name, config: Fake(order["loop" if name == config.task else "spec"]))
  c = _config(task="bigbench:f", specialists=("bigbench:g",), dev_examples=6,
              specialist_examples=100)
  rows = pools.specialist_rows(c, "bigbench:g")
  loop_dev = {e.id for e in common.balanced(dev, 6, c.seed)}
  assert len(loop_dev) == 6
  assert {e.id for e in rows} == {e.id for e in dev[:20]} - loop_dev  # Not f/20: it is tested.
  order["spec"] = dev  # Another file order: the same rows in the same order.
  assert pools.specialist_rows(c, "bigbench:g") == rows
  assert len(pools.specialist_rows(_config(task="bigbench:f", specialists=("bigbench:g",),
                                           dev_examples=6, specialist_examples=4),
                                   "bigbench:g")) == 4


def test_held_out_dev_rows_meet_neither_the_loops_dev_nor_specialist_rows(monkeypatch,
                                                                          tiny_pool):
  """evaluate_on="validation" scores held-out dev rows and fit_examples fits strategies on
  others: none is among the loop's dev rows or a specialist's training rows, none is a test row,
  fit and validation rows never meet, each is balanced over the families, and the choice is
  stable; the config check refuses another evaluate_on."""
  from single_multi import pools
  from single_multi.data import common, tasks

  def ex(s, i):
    return common.Example(f"{s}/{i}", s, f"{s} question {i}", targets=("x",))
  dev = [ex(s, i) for s in ("f", "g") for i in range(30)]
  test = [ex("f", 100), ex("g", 100)]

  Fake = functools.partial(_FakeTask, test=test)
  monkeypatch.setattr(tasks, "from_config", lambda name, config: Fake(
      dev if name == config.task else [e for e in dev if e.subject == name[-1]]))
  c = _config(task="bigbench:f,g", specialists=("bigbench:f", "bigbench:g"), dev_examples=10,
              specialist_examples=8, test_examples=20, evaluate_on="validation")
  spec.validate(c)
  loop_dev = common.balanced(dev, 10, c.seed)
  val = evolve.held_out_dev_rows(c, Fake(dev), loop_dev, c.test_examples, "validation rows")
  held = {e.id for e in loop_dev}
  for name in c.specialists:
    held |= {e.id for e in pools.specialist_rows(c, name)}
  assert len(held) == 10 + 16
  ids = {e.id for e in val}
  assert len(val) == 20 and not ids & held and not ids & {e.id for e in test}
  assert common.composition(val) == {"f": 10, "g": 10}
  assert evolve.held_out_dev_rows(c, Fake(list(reversed(dev))), loop_dev, 20, "v") == val
  # Only 17 rows per family are left: a larger request takes every one of them.
  assert len(evolve.held_out_dev_rows(c, Fake(dev), loop_dev, 100, "v")) == 60 - 26
  # make_loop: fit rows (fit_examples) and validation rows, each held out from the other.
  c.fit_examples = 8
  loop = evolve.make_loop(c, tiny_pool, progress=False)
  assert loop.dev == loop_dev and loop.fit_split == "fit"
  assert common.composition(loop.fit_rows) == {"f": 4, "g": 4}
  assert len(loop.test) == 20 and not {e.id for e in loop.fit_rows} & (
      held | {e.id for e in loop.test})
  assert loop.test == val  # The validation rows do not depend on fit_examples,
  fit = loop.fit_rows
  c.evaluate_on = "test"  # and the fit rows do not depend on evaluate_on.
  assert evolve.make_loop(c, tiny_pool, progress=False).fit_rows == fit
  c.evaluate_on, c.fit_examples = "validation", 0
  loop = evolve.make_loop(c, tiny_pool, progress=False)
  assert loop.fit_rows is loop.dev and loop.fit_split == "dev" and loop.test == val
  c.evaluate_on = "holdout"
  with pytest.raises(evolve.ConfigError, match="evaluate_on='holdout' is not allowed"):
    spec.validate(c)
  c.evaluate_on, c.fit_examples, c.fused_round = "test", 8, True
  with pytest.raises(evolve.ConfigError, match="fit_examples: strategies fitted on held-out"):
    spec.validate(c)


def test_fit_examples_fit_the_router_on_rows_the_members_never_distil(tiny_pool, tmp_path,
                                                                      monkeypatch):
  """With fit_examples the router is fitted, every time (round 0's test, round 1's collaboration
  and its test), on the fit rows' scores, and the members distil the collaboration's answers on
  the dev rows only."""
  from single_multi import collab
  calls, fits = [], []
  evaluate_fn, fit_fn = evolve.evaluate.evaluate, collab.fit

  def spy_evaluate(pool, examples, **kw):
    calls.append((kw["split"], [e.id for e in examples]))
    return evaluate_fn(pool, examples, **kw)

  def spy_fit(pool, strategy, dev, **kw):
    fits.append(np.asarray(dev.scores).shape)
    return fit_fn(pool, strategy, dev, **kw)
  monkeypatch.setattr(evolve.evaluate, "evaluate", spy_evaluate)
  monkeypatch.setattr(collab, "fit", spy_fit)
  c = _config(strategy="trained_router", fit_examples=6)
  evolve.run(c, tmp_path, tiny_pool, progress=False)
  by_split = {}
  for split, ids in calls:
    by_split.setdefault(split, []).append(ids)
  fit_ids, dev_ids = by_split["fit"][0], by_split["dev"][0]
  assert len(fit_ids) == 6 and len(dev_ids) == 8 and not set(fit_ids) & set(dev_ids)
  assert by_split["fit"] == [fit_ids] * 3 and fits == [(3, 6)] * 3
  assert all(ids == dev_ids for ids in by_split["dev"])  # The distillation's rows: dev only.
  taught = [json.loads(line) for line in (tmp_path / "round_1" / "collaboration_dev" /
                                           "records.jsonl").read_text().splitlines()]
  assert sorted(r["id"] for r in taught) == sorted(dev_ids)


def test_a_specialist_pool_records_each_specialists_base_and_own_score(tiny_pool, tmp_path):
  """summary.json's "specialists": the base (pool[0]) answers its families' test rows at round 0;
  each specialist's entry is the base's and its own round-0 score on its family (None where the
  family is not tested)."""
  family = "arithmetic/1_digit_addition"
  c = _config(pool=("tiny:0",), rounds=0, specialists=(
      f"bigbench:{family}", "bigbench:navigate", "bigbench:general_knowledge"))
  history = evolve.run(c, tmp_path, tiny_pool, progress=False)
  summary = json.loads((tmp_path / "summary.json").read_text())
  got = summary["specialists"]
  assert list(got) == ["t0", "t1", "t2"] and got["t1"]["base"] is None
  assert got["t0"]["task"] == f"bigbench:{family}"
  assert got["t0"]["score"] == history[0]["by_task"]["t0"][family]
  base = [json.loads(line) for line in
          (tmp_path / "round_0" / "base" / "records.jsonl").read_text().splitlines()]
  assert {r["subject"] for r in base} == {family} and len(base) == summary["composition"][family]
  assert got["t0"]["base"] == pytest.approx(np.mean([r["score"] for r in base]))


def test_a_round_with_no_correct_collaborative_answer_distils_nothing_and_goes_on(
    tiny_pool, tmp_path, capsys):
  """The correctness filter keeps no dev output of random models (none answers 1-digit addition):
  the round skips distillation with a warning instead of stopping the run (a results.py sweep
  went on past such a strategy only after this), the members keep their params exactly (the same
  test answers in round 1 as in round 0), and the round's record says why."""
  check_round_without_training_rows(_config(**{"distill.correctness_filter": True}), tiny_pool,
                                    tmp_path, lambda: capsys.readouterr().out, "output_ids")


def test_an_eval_cache_shares_evaluations_across_runs_and_rounds(tiny_pool, tmp_path,
                                                                 monkeypatch):
  """A second run of the same config in a fresh workdir decodes nothing and gives the same
  metrics; within a run, round 1's collaborate stage reads the fit rows' answers round 0
  decoded with the same params (greedy), so a cached run decodes less than a plain one."""
  decodes = []
  real = pool_lib.decode_each
  monkeypatch.setattr(pool_lib, "decode_each",
                      lambda *a, **k: decodes.append(1) or real(*a, **k))
  plain = evolve.run(_config(strategy="trained_router", eval_cache=""), tmp_path / "plain",
                     tiny_pool, progress=False)
  n_plain = len(decodes)
  decodes.clear()
  c = _config(strategy="trained_router", eval_cache=str(tmp_path / "cache"))
  first = evolve.run(c, tmp_path / "a", tiny_pool, progress=False)
  n_first = len(decodes)
  decodes.clear()
  second = evolve.run(c, tmp_path / "b", tiny_pool, progress=False)
  assert first == plain and second == plain
  assert 0 < n_first < n_plain and decodes == []
  # eval_cache="workdir": the run's own <workdir>/eval_cache, so a fresh run decodes as much as
  # the first cached one and keeps its records there.
  own = evolve.run(_config(strategy="trained_router", eval_cache="workdir"), tmp_path / "w",
                   tiny_pool, progress=False)
  assert own == plain and len(decodes) == n_first
  kept = lambda d: sorted(p.name for p in d.glob("*.jsonl"))
  assert kept(tmp_path / "w" / "eval_cache") == kept(tmp_path / "cache") != []
  # A loop made outside `run` (no workdir) keeps nothing.
  assert evolve.eval_cache_dir(_config(eval_cache="workdir")) is None
  assert evolve.make_loop(_config(eval_cache="workdir"), tiny_pool, progress=False).memo is None


def test_replay_adds_each_members_own_specialist_rows_to_its_distillation(tiny_pool, tmp_path,
                                                                         monkeypatch):
  """distill.replay=k: member i trains on the round's rows (the same for every member) and then
  the first k rows its specialist was fine-tuned on, as that fine-tune saw them (its prompt, the
  gold answer, eos; the loss on the answer and eos); the config check refuses replay where there
  are no specialists' rows to replay or the method builds its own per-member rows."""
  from single_multi import pools
  families = ("arithmetic/1_digit_addition", "navigate", "general_knowledge")
  c = _config(pool=("tiny:0",), specialists=tuple(f"bigbench:{f}" for f in families),
              **{"distill.replay": 2})
  seen = {}
  real = distill.train_pool

  def spy(params, data, *a, per_model_batch=False, **k):
    seen.update(data=data, per_model=per_model_batch)
    return real(params, data, *a, per_model_batch=per_model_batch, **k)

  monkeypatch.setattr(distill, "train_pool", spy)
  evolve.run(c, tmp_path, tiny_pool, progress=False)
  data = {k: np.asarray(v) for k, v in seen["data"].items()}
  R = c.dev_examples  # No correctness filter: every dev row.
  assert seen["per_model"] and data["tokens"].shape[:2] == (3, R + 2)
  for i, name in enumerate(c.specialists):
    # The round's rows: the same for every member.
    for key in data:
      np.testing.assert_array_equal(data[key][i, :-2], data[key][0, :-2])
    prompter = pools.specialist_prompter(c, tiny_pool.tokenizer, name)
    eos = decoding.stop_ids_for(tiny_pool.config, tiny_pool.tokenizer)[0]
    for j, ex in enumerate(pools.specialist_rows(c, name)[:2]):
      tokens, mask, loss = (data[k][i, R + j] for k in ("tokens", "mask", "loss_mask"))
      answer = tiny_pool.tokenizer(pipeline.gold_answer(ex), add_special_tokens=False)[
          "input_ids"] + [eos]
      assert tokens[mask > 0].tolist() == prompter.ids(ex) + answer
      assert tokens[loss > 0].tolist() == answer and (loss <= mask).all()
  for overrides in ({"specialists": (), "pool": ("tiny:0", "tiny:1", "tiny:2")},
                    {"distill.method": "multi_student_kd"},
                    {"fused_round": True, "distill.correctness_filter": False}):
    with pytest.raises(evolve.ConfigError, match="distill.replay=2"):
      spec.validate(_config(**{"pool": ("tiny:0",), "specialists": c.specialists,
                               "distill.replay": 2, **overrides}))


def test_fingerprints_are_the_bits_checksums_and_copy_nothing():
  """workdir.fingerprints: per leaf the sum and the position-weighted sum (1-based) of its bits
  modulo 2^32, as a numpy replica computes them (float32, bfloat16, bool, int64 leaves); the
  program keeps no copy of the tree (XLA:CPU's temporaries: bytes, not the leaves' size)."""
  rng = np.random.default_rng(0)
  tree = {"f": rng.normal(size=(3, 70, 50)).astype(np.float32),
          "h": jax.numpy.asarray(rng.normal(size=(9, 7)), jax.numpy.bfloat16),
          "b": rng.random(33) < 0.5, "i": rng.integers(-2**40, 2**40, size=(5,), dtype=np.int64)}

  def replica(x):
    x = np.asarray(x)
    if x.dtype == np.bool_:
      bits = x.astype(np.uint64).reshape(-1)
    else:
      view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
      bits = x.view(view).astype(np.uint64).reshape(-1)
    index = np.arange(1, bits.size + 1, dtype=np.uint64)
    return [int(bits.sum() % 2**32), int((bits * index % 2**32).sum() % 2**32)]

  with jax.enable_x64(True):
    got = wd.fingerprints(tree)
    assert got == {f"['{k}']": replica(v) for k, v in tree.items()}
  big = {"a": jax.numpy.ones((64, 1024, 256)), "b": jax.numpy.ones((16, 1024, 256))}  # 80 MiB.
  temp = wd._fingerprints.lower(big).compile().memory_analysis().temp_size_in_bytes
  assert temp < 2**20, temp
