"""The evolution loop on tiny random models and a real BIG-bench slice: one round per strategy,
kill/resume at every stage, bad input, multi-student data never from test, the dry-run plan."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from configs_loader import load_config

from single_multi import assets, evolve, pool as pool_lib
from single_multi.data import tasks

from test_evaluate import _model

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_pool():
  try:
    tasks.load_task("bigbench:arithmetic/1_digit_addition")
  except assets.AssetError as e:
    pytest.skip(f"BIG-bench sdist unavailable: {e}")
  return pool_lib.from_models([_model(s) for s in range(3)], ["t0", "t1", "t2"])


def _config(**overrides):
  c = load_config("tiny.py")
  for k, v in overrides.items():
    target = c
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return c


@pytest.mark.parametrize("strategy", ["logit_fusion", "multiagent_refine", "trained_router"])
def test_one_round_end_to_end_and_distillation_lowers_the_loss(tiny_pool, tmp_path, strategy):
  c = _config(strategy=strategy, **{"distill.epochs": 3.0})
  history = evolve.run(c, tmp_path, tiny_pool, progress=False)
  assert [m["round"] for m in history] == [0, 1]
  for m in history:
    assert set(m["singles"]) == {"t0", "t1", "t2"} and 0 <= m["collab"] <= 1
    lo, hi = m["collab_ci95"]
    assert lo <= m["collab"] <= hi
  d = history[1]["distill"]
  assert all(last < first for first, last in zip(d["first_loss"], d["last_loss"])), d
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
  records = (tmp_path / "round_1" / "collaboration" / "records.jsonl").read_text().splitlines()
  assert len(records) == 8 and json.loads(records[0])["model"] == strategy


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
  c = _config()
  want = evolve.run(c, tmp_path / "whole", tiny_pool, progress=False)
  stages = evolve.stage_list(c.rounds)
  for k in range(len(stages) - 1):
    workdir = tmp_path / f"killed_{k}"
    with pytest.raises(evolve.Interrupted):
      evolve.run(c, workdir, tiny_pool, progress=False, stop_after=k)
    got = evolve.run(c, workdir, tiny_pool, progress=False)
    assert got == want, f"resumed after stage {k} ({stages[k]})"


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
  # A damaged checkpoint: a clear error naming the directory.
  c = _config()
  with pytest.raises(evolve.Interrupted):
    evolve.run(c, tmp_path / "run", tiny_pool, progress=False, stop_after=0)
  for f in (tmp_path / "run" / "checkpoints" / "0" / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(evolve.CheckpointError, match="cannot restore checkpoint 0"):
    evolve.run(c, tmp_path / "run", tiny_pool, progress=False)
  # A partial (uncommitted) save is ignored: the run starts over from the start.
  partial = tmp_path / "partial" / "checkpoints" / "3.orbax-checkpoint-tmp-123"
  partial.mkdir(parents=True)
  history = evolve.run(_config(rounds=0), tmp_path / "partial", tiny_pool, progress=False)
  assert [m["round"] for m in history] == [0]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_pool,
                                                                             tmp_path):
  c = _config(**{"distill.learning_rate": float("nan")})
  with pytest.raises(FloatingPointError, match="distillation loss"):
    evolve.run(c, tmp_path, tiny_pool, progress=False)
  ckpt = evolve.Checkpoints(tmp_path / "checkpoints", 2)
  assert ckpt.latest() == 1  # round 1 "collaborate" finished; "distill" never saved.
  ckpt.close()


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
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "single_multi.main", "--config=configs/mmlu.py",
                         "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "3 x qwen2 (hidden 3584, 28 layers, vocab 152064)" in out and "8 devices" in out
  line = out.split("bytes per device: ")[1].splitlines()[0]
  per_device = [float(x.split()[0]) for x in line.split(": ")[1:]]
  assert len(per_device) == 8
  # 3 x 7.6B bf16 params over 8 devices: about 5.3 GiB each, plus LoRA and AdamW states.
  assert all(5.0 < v < 6.5 for v in per_device), per_device
  replicated = out.split("replicated leaves: ")[1]
  assert "0 of them >= 1 MiB" in replicated
  assert "params['embed']" in out and "opt_state" in out
