"""Co-LLM: the marginal likelihood against brute-force enumeration and finite differences, a
synthetic task where deferral must be learned exactly, gate initialisation, calibration, baselines
and a checkpoint round trip."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from single_multi import co_llm, decoding, pool as pool_lib, train as train_lib
from single_multi.collab import core
from single_multi.models import transformer
from single_multi.models.config import ModelConfig

CONFIG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                     tie_word_embeddings=False, eos_token_ids=(31,))
MARKED = np.arange(20, 30)  # The token class only the assistant predicts.


def _brute_force(l, base_lp, asst_lp):
  """-(1/T) log sum over all 2^T gate assignments of prod_t P(z_t) P_z(x_t)."""
  T = len(l)
  total = 0.0
  for z in itertools.product([0, 1], repeat=T):
    p = 1.0
    for t, zt in enumerate(z):
      gate = 1 / (1 + np.exp(-l[t]))
      p *= gate * np.exp(asst_lp[t]) if zt else (1 - gate) * np.exp(base_lp[t])
    total += p
  return -np.log(total) / T


@pytest.mark.parametrize("T", [1, 3, 8])
def test_marginal_nll_equals_enumeration_and_its_gradient_finite_differences(T):
  rng = np.random.default_rng(T)
  l = rng.normal(0, 2, T)
  base_lp = np.log(rng.uniform(0.01, 1, T))
  asst_lp = np.log(rng.uniform(0.01, 1, T))
  with jax.enable_x64(True):
    got = co_llm.marginal_nll(jnp.asarray(l), jnp.asarray(base_lp), jnp.asarray(asst_lp),
                              jnp.ones(T))
    assert float(got) == pytest.approx(_brute_force(l, base_lp, asst_lp), rel=1e-10)
    f = lambda x: co_llm.marginal_nll(x, jnp.asarray(base_lp), jnp.asarray(asst_lp), jnp.ones(T))
    grad = np.asarray(jax.grad(f)(jnp.asarray(l)))
    eps = 1e-6
    for t in range(T):
      e = np.zeros(T)
      e[t] = eps
      fd = (_brute_force(l + e, base_lp, asst_lp) - _brute_force(l - e, base_lp, asst_lp)) / (2 * eps)
      assert grad[t] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def _brute_force_m(l, base_lp, asst_lp):
  """-(1/T) log sum over all (M+1)^T assignments of prod_t P(z_t) P_z(x_t), P(z_t) =
  softmax([0, l_t1, ..., l_tM]); l, asst_lp [T, M]."""
  T, M = l.shape
  choice = np.exp(np.concatenate([np.zeros((T, 1)), l], 1))
  choice /= choice.sum(1, keepdims=True)
  logp = np.concatenate([base_lp[:, None], asst_lp], 1)
  total = sum(np.prod([choice[t, k] * np.exp(logp[t, k]) for t, k in enumerate(z)])
              for z in itertools.product(range(M + 1), repeat=T))
  return -np.log(total) / T


@pytest.mark.parametrize("T", [1, 3, 5])
def test_marginal_nll_over_two_assistants_equals_enumeration_and_finite_differences(T):
  rng = np.random.default_rng(10 + T)
  l = rng.normal(0, 2, (T, 2))
  base_lp = np.log(rng.uniform(0.01, 1, T))
  asst_lp = np.log(rng.uniform(0.01, 1, (T, 2)))
  with jax.enable_x64(True):
    f = lambda x: co_llm.marginal_nll(x, jnp.asarray(base_lp), jnp.asarray(asst_lp), jnp.ones(T))
    assert float(f(jnp.asarray(l))) == pytest.approx(_brute_force_m(l, base_lp, asst_lp),
                                                     rel=1e-10)
    grad = np.asarray(jax.grad(f)(jnp.asarray(l)))
    eps = 1e-6
    for t, m in itertools.product(range(T), range(2)):
      e = np.zeros((T, 2))
      e[t, m] = eps
      fd = (_brute_force_m(l + e, base_lp, asst_lp)
            - _brute_force_m(l - e, base_lp, asst_lp)) / (2 * eps)
      assert grad[t, m] == pytest.approx(fd, rel=1e-5, abs=1e-8)
    # One assistant given as a stack of one: the sigmoid form.
    one = co_llm.marginal_nll(jnp.asarray(l[:, :1]), jnp.asarray(base_lp),
                              jnp.asarray(asst_lp[:, :1]), jnp.ones(T))
    assert float(one) == pytest.approx(_brute_force(l[:, 0], base_lp, asst_lp[:, 0]), rel=1e-10)


def test_training_with_two_assistants_learns_which_one_to_defer_to():
  """Two assistants, each right (p 0.99) on half of the marked class only; blocks (3, 4, 5, M)
  end in a token of the first half, blocks (6, 7, 8, M) in one of the second, so the context says
  which assistant knows the next token: the gate must learn to pick it per position."""
  params = transformer.init_params(CONFIG, jax.random.key(0))
  halves = (MARKED[:5], MARKED[5:])

  def two(n, seed):
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
      s = [1]
      for _ in range(4):
        kind = int(rng.integers(2))
        s += [3 + 3 * kind, 4 + 3 * kind, 5 + 3 * kind, int(rng.choice(halves[kind]))]
      seqs.append(s)
    tokens = np.asarray(seqs, np.int32)
    nxt = tokens[:, 1:]
    knows = [np.isin(nxt, h) for h in halves]
    lp = np.stack([np.where(k, np.log(0.99), np.log(1e-3)) for k in knows], -1)
    ones = jnp.ones(tokens.shape, jnp.int32)
    data = co_llm.TrainData(jnp.asarray(tokens), ones, ones, jnp.asarray(lp, jnp.float32),
                            jnp.asarray(np.stack(knows, -1)))
    return data, knows

  data, _ = two(64, 0)
  cfg = co_llm.CoLlmTrainConfig(
      train_base="full", steps=150, batch_size=16, init="none", gate_learning_rate=3e-2,
      optim=train_lib.OptimConfig(learning_rate=3e-3, warmup_fraction=0.05))
  result = co_llm.train(params, data, CONFIG, cfg, progress=False)
  assert result.w_defer.shape == (2, CONFIG.hidden_size)
  test, knows = two(32, 1)
  z = _gates(result.params, result.w_defer.T, test)  # [S, T-1, 2]
  choice = np.argmax(np.concatenate([np.zeros(z.shape[:-1] + (1,)), z], -1), -1)
  for m, k in enumerate(knows):
    assert (choice[k] == m + 1).mean() > 0.9, (m, (choice[k] == m + 1).mean())
  neither = ~(knows[0] | knows[1])
  assert (choice[neither] == 0).mean() > 0.9


def test_pads_are_masked():
  rng = np.random.default_rng(0)
  l, b, a = (jnp.asarray(rng.normal(size=(2, 6))) for _ in range(3))
  w = jnp.asarray([[1, 1, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1]], jnp.float32)
  base = co_llm.marginal_nll(l, -jnp.abs(b), -jnp.abs(a), w)
  noisy = co_llm.marginal_nll(l + 100 * (1 - w), -jnp.abs(b) - 50 * (1 - w), -jnp.abs(a), w)
  assert float(base) == pytest.approx(float(noisy), rel=1e-6)


def _synthetic(n, seed):
  """Blocks (3, 4, 5, M), M uniform over MARKED: the base can learn 3 -> 4 -> 5 -> ? -> 3; the
  assistant (precomputed) is right with p 0.99 on every M and near 0 elsewhere."""
  rng = np.random.default_rng(seed)
  seqs = []
  for _ in range(n):
    s = [1]
    for _ in range(4):
      s += [3, 4, 5, int(rng.choice(MARKED))]
    seqs.append(s)
  tokens = np.asarray(seqs, np.int32)
  mask = np.ones_like(tokens)
  marked = np.isin(tokens[:, 1:], MARKED)
  asst_lp = np.where(marked, np.log(0.99), np.log(1e-3)).astype(np.float32)
  data = co_llm.TrainData(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(mask),
                          jnp.asarray(asst_lp), jnp.asarray(marked))
  return data, marked


def _gates(params, w, data):
  _, _, hidden = co_llm.gold_logprobs(params, data.tokens, data.mask, CONFIG)
  return np.asarray(hidden @ w)


def test_training_learns_to_defer_exactly_on_the_assistants_token_class():
  params = transformer.init_params(CONFIG, jax.random.key(0))
  data, _ = _synthetic(64, 0)
  cfg = co_llm.CoLlmTrainConfig(
      train_base="full", steps=150, batch_size=16, init="none", gate_learning_rate=3e-2,
      optim=train_lib.OptimConfig(learning_rate=3e-3, warmup_fraction=0.05))
  result = co_llm.train(params, data, CONFIG, cfg, progress=False)
  assert result.history[-1]["loss"] < result.history[0]["loss"] * 0.5
  test, marked = _synthetic(32, 1)
  defer = _gates(result.params, result.w_defer, test) > 0
  precision = (defer & marked).sum() / max(defer.sum(), 1)
  recall = (defer & marked).sum() / marked.sum()
  assert precision > 0.9 and recall > 0.9, (precision, recall)


def test_gate_init_reproduces_the_pseudo_label_rate_and_stays_inside_0_1():
  params = transformer.init_params(CONFIG, jax.random.key(1))
  data, _ = _synthetic(32, 2)
  cfg = co_llm.CoLlmTrainConfig(init_epochs=50, init_batch_size=8, init_learning_rate=1e-2)
  w, stats = co_llm.init_gate(params, data, CONFIG, cfg)
  assert 0.15 < stats["label_rate"] < 0.3  # About one position in four is marked.
  assert stats["defer_rate"] == pytest.approx(stats["label_rate"], abs=0.03)
  p = np.asarray(jax.nn.sigmoid(_gates(params, w, data)))
  assert ((p > 0) & (p < 1)).all()
  _, stats_b = co_llm.init_gate(params, data, CONFIG, co_llm.CoLlmTrainConfig(init="b"))
  assert stats_b["label_rate"] >= stats["label_rate"]  # "base wrong" contains "a".


def test_gate_init_streams_without_an_all_rows_hidden_state_tensor(monkeypatch):
  """The bytes of live arrays during init stay far below one float32 copy of every row's hidden
  states ([S, T-1, D]: what the all-rows fit held, and what grows to ~29 GB at the GSM8K config's
  7,000 x 256 x 4,096): only a batch is ever materialised."""
  params = transformer.init_params(CONFIG, jax.random.key(1))
  data, _ = _synthetic(128, 3)
  all_hidden = data.tokens.shape[0] * (data.tokens.shape[1] - 1) * CONFIG.hidden_size * 4
  live = lambda: sum(a.nbytes for a in jax.live_arrays())
  before = live()
  peaks = []
  step = co_llm._init_step

  def counted(*args, **kwargs):
    out = step(*args, **kwargs)
    jax.block_until_ready(out)
    peaks.append(live() - before)
    return out

  monkeypatch.setattr(co_llm, "_init_step", counted)
  co_llm.init_gate(params, data, CONFIG, co_llm.CoLlmTrainConfig(init_epochs=2))
  assert len(peaks) == 2 * 128 // 8
  assert max(peaks) < all_hidden / 4, (max(peaks), all_hidden)


def test_weak_supervision_labels_are_fixed_from_the_original_base():
  """The weak baseline's BCE targets come from `data.base_correct` (the original base, scored
  once), not from the base being trained: told the base is always right, it learns never to
  defer; told it is always wrong, it defers on the assistant's token class."""
  params = transformer.init_params(CONFIG, jax.random.key(4))
  data, _ = _synthetic(64, 4)
  test, marked = _synthetic(32, 5)
  cfg = co_llm.CoLlmTrainConfig(train_base="gate", steps=120, batch_size=16,
                                optim=train_lib.OptimConfig(learning_rate=3e-2))
  with pytest.raises(ValueError, match="original base's labels"):
    co_llm.train(params, data, CONFIG, cfg, objective="weak", progress=False)
  rates = {}
  for right in (True, False):
    fixed = data.replace(base_correct=jnp.full_like(data.asst_correct, right))
    w = co_llm.train(params, fixed, CONFIG, cfg, objective="weak", progress=False).w_defer
    defer = _gates(params, w, test) > 0
    rates[right] = (defer[marked].mean(), defer[~marked].mean())
  assert rates[True][0] < 0.05 and rates[True][1] < 0.05, rates
  assert rates[False][0] > 0.9 and rates[False][1] < 0.1, rates


def test_train_config_counts_epochs_or_takes_steps():
  cfg = co_llm.CoLlmTrainConfig()  # The reference's: 2 epochs of batch 128.
  assert (cfg.total_steps(300), cfg.total_steps(7000)) == (5, 110)
  assert co_llm.CoLlmTrainConfig(steps=7).total_steps(7000) == 7
  with pytest.raises(ValueError, match="steps > 0 or epochs > 0"):
    co_llm.CoLlmTrainConfig(epochs=0.0)


def test_co_llm_rows_never_mix():
  from ml_collections import config_dict
  from single_multi import co_llm_run
  from single_multi.data import common
  rows = lambda split, n, q=lambda i: f"q{i}": [
      common.Example(f"t/{split}/{i}", "t", q(i), targets=("1",)) for i in range(n)]
  c = config_dict.ConfigDict(dict(val_fraction=0.25, val_examples=100, assistant="", seed=0,
                                  assistant_examples=10, train_examples=100, test_examples=100))
  dev = rows("dev", 40)
  dev[3] = common.Example("t/dev/3", "t", "bad", problem="line 4: blank line")
  split = co_llm_run.split_rows(dev, rows("test", 12, lambda i: f"q{30 + i}"), c)
  assert {k: len(v) for k, v in split.items()} == {"assistant": 10, "train": 19,
                                                   "validation": 10, "test": 12}
  ids = [e.id for v in split.values() for e in v]
  assert len(ids) == len(set(ids)) and "t/dev/3" not in ids
  # Test questions q30..q41 repeat the wording of dev rows q30..q39 (validation: q30..q39).
  assert co_llm_run.disjoint_rows(split) == {"validation/test": 10}
  c.assistant = "hf:some/model"  # A given assistant: no rows go to it.
  assert co_llm_run.split_rows(dev, [], c)["assistant"] == []
  with pytest.raises(ValueError, match="t/dev/5 is in both the assistant rows and the test"):
    co_llm_run.disjoint_rows({"assistant": dev[5:6], "test": dev[5:6]})
  # Training text: the gold answer, or the worked solution where every training row has one.
  assert co_llm_run.training_target("answer", split)(split["train"][0]) == "1"
  with pytest.raises(ValueError, match="no worked solution.*use target='answer'"):
    co_llm_run.training_target("solution", split)
  worked = {k: [dataclasses.replace(e, solution=f"{e.question} so 1. #### 1") for e in v]
            for k, v in split.items()}
  first = worked["train"][0]
  assert co_llm_run.training_target("solution", worked)(first) == f"{first.question} so 1. #### 1"


def test_co_llm_rows_of_a_mixture_are_balanced_and_the_assistant_keeps_to_its_families():
  from ml_collections import config_dict
  from single_multi import co_llm_run
  from single_multi.data import common
  rows = lambda split, subject, n: [common.Example(f"{subject}/{split}/{i}", subject,
                                                   f"{subject} q{split}{i}", targets=("1",))
                                    for i in range(n)]
  dev = rows("dev", "mul", 40) + rows("dev", "add", 20)  # Grouped by family, as builders store.
  c = config_dict.ConfigDict(dict(val_fraction=0.25, val_examples=8, assistant="", seed=0,
                                  assistant_examples=12, assistant_subjects=("mul",),
                                  train_examples=16, test_examples=10))
  split = co_llm_run.split_rows(dev, rows("test", "mul", 30) + rows("test", "add", 30), c)
  per = {k: common.composition(v) for k, v in split.items()}
  assert per == {"assistant": {"mul": 12}, "train": {"add": 8, "mul": 8},
                 "validation": {"add": 4, "mul": 4}, "test": {"add": 5, "mul": 5}}
  # Validation is each family's last quarter (mul rows 30..39, add rows 15..19), never trained on.
  assert {e.id for e in split["validation"]} <= (
      {f"mul/dev/{i}" for i in range(30, 40)} | {f"add/dev/{i}" for i in range(15, 20)})
  co_llm_run.disjoint_rows(split)  # Raises on a shared id.
  # The same seed draws the same rows; another seed others.
  assert co_llm_run.split_rows(dev, [], c)["train"] == split["train"]
  c.seed = 1
  assert co_llm_run.split_rows(dev, [], c)["train"] != split["train"]
  c.assistant_subjects = ("div",)
  with pytest.raises(ValueError, match=r"\['div'\] are not task families.*'add', 'mul'"):
    co_llm_run.split_rows(dev, [], c)
  # A base specialist: rows of its own families, none of the assistant's, the gate's or
  # validation's; the gate takes what is left.
  c.seed, c.assistant_subjects = 0, ("mul",)
  c.base_subjects, c.base_examples = ("add",), 6
  split = co_llm_run.split_rows(dev, rows("test", "mul", 30) + rows("test", "add", 30), c)
  per = {k: common.composition(v) for k, v in split.items()}
  assert per["base"] == {"add": 6} and per["assistant"] == {"mul": 12}
  # add: 15 rows outside validation, 6 of them the base's; 8 of the other 9 train the gate.
  assert per["train"] == {"add": 8, "mul": 8}
  assert not {e.id for e in split["base"]} & {e.id for e in split["train"]}
  co_llm_run.disjoint_rows(split)
  c.base_examples = 16  # More than the 15 add rows outside validation.
  with pytest.raises(ValueError, match="15 dev rows outside validation for the base"):
    co_llm_run.split_rows(dev, [], c)


@pytest.fixture(scope="module")
def pair():
  base = transformer.init_params(CONFIG, jax.random.key(2))
  asst = transformer.init_params(CONFIG, jax.random.key(3))
  scale = lambda p: jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, p)
  return pool_lib.stack([scale(base), scale(asst)])


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, 30, (4, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  return core.Batch(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(ids), jnp.asarray(mask))


def _env():
  return core.Env(config=CONFIG, max_new_tokens=8, stop_ids=(31,), pad_id=0)


def test_random_deferral_extremes(pair):
  env, batch = _env(), _batch()
  base = decoding.decode(jax.tree.map(lambda x: x[0], pair), batch.prompt, batch.prompt_mask,
                         jax.random.key(0), **env.decode_kw)
  asst = decoding.decode(jax.tree.map(lambda x: x[1], pair), batch.prompt, batch.prompt_mask,
                         jax.random.key(0), **env.decode_kw)
  zero = co_llm.decode_random(pair, batch, jax.random.key(0), rate=0.0, env=env)
  one = co_llm.decode_random(pair, batch, jax.random.key(0), rate=1.0, env=env)
  np.testing.assert_array_equal(zero.tokens, base.tokens)
  np.testing.assert_array_equal(one.tokens, asst.tokens)
  # The gate at eta 1 (never defer) and eta 0 (always): each model alone, as the job's test
  # decodes the base and the assistant (co_llm_run: one model, not the pair).
  w = 0.3 * jax.random.normal(jax.random.key(4), (CONFIG.hidden_size,))
  never = co_llm.decode(pair, batch, w, eta=1.0, env=env)
  always = co_llm.decode(pair, batch, w, eta=0.0, env=env)
  np.testing.assert_array_equal(never.tokens, base.tokens)
  np.testing.assert_array_equal(always.tokens, asst.tokens)
  assert co_llm.deferral_frequency(never) == 0 and co_llm.deferral_frequency(always) == 1
  assert co_llm.deferral_frequency(zero) == 0 and co_llm.deferral_frequency(one) == 1


def test_calibration_sweeps_rates_and_checkpoint_reloads_identically(pair, tmp_path):
  env, batches = _env(), [_batch(0), _batch(1)]
  w = 0.3 * jax.random.normal(jax.random.key(4), (CONFIG.hidden_size,))
  asst_tokens = [decoding.decode(jax.tree.map(lambda x: x[1], pair), b.prompt, b.prompt_mask,
                                 jax.random.key(0), **env.decode_kw).tokens for b in batches]
  # A validation metric that rewards agreeing with the assistant: more deferral scores higher.
  score = lambda outs: [float(np.mean(row)) for o, a in zip(outs, asst_tokens)
                        for row in np.asarray(o.tokens) == np.asarray(a)]  # Per row.
  eta, table = co_llm.calibrate(pair, batches, w, score, env=env)
  for r in table:
    assert r["ci95"][0] <= r["score"] <= r["ci95"][1]
    assert r["score"] == pytest.approx(np.mean(score(
        [co_llm.decode(pair, b, w, eta=r["eta"], env=env) for b in batches])))
  assert [r["rate"] for r in table] == [i / 10 for i in range(10)]
  assert table[0]["deferral"] == 0 and table[0]["eta"] == 1.0
  assert table[-1]["deferral"] > table[1]["deferral"]
  assert eta == max(table, key=lambda r: (r["score"], -r["rate"]))["eta"]
  out = co_llm.decode(pair, batches[0], w, eta=eta, env=env)
  co_llm.save(tmp_path / "ckpt", pair, w, eta)
  params, w2, eta2 = co_llm.load(tmp_path / "ckpt")
  assert eta2 == pytest.approx(eta)
  again = co_llm.decode(params, batches[0], w2, eta=eta2, env=env)
  np.testing.assert_array_equal(again.tokens, out.tokens)
  np.testing.assert_array_equal(again.extras["deferred"], out.extras["deferred"])
  traces = co_llm.deferral_traces(_CharTok(), out, ["a", "b", "c", "d"])
  page = co_llm.write_traces(traces, tmp_path / "traces")
  assert page.read_text().count("<div>") == 4
  assert sum(p["deferred"] for t in traces for p in t["tokens"]) == int(
      np.asarray(out.extras["deferred"]).sum())


def test_live_tokens_by_hand():
  mask = jnp.asarray([[1, 1], [0, 1], [0, 0]])  # Row 2: a filler (empty prompt).
  batch = core.Batch(mask, mask, mask, mask)
  out = core.Output(jnp.zeros((3, 3), jnp.int32), jnp.asarray([2, 0, 3]), None, {})
  np.testing.assert_array_equal(co_llm.live_tokens(batch, out),
                                [[1, 1, 0], [0, 0, 0], [0, 0, 0]])


def test_calibration_counts_no_filler_row(pair):
  """A batch's filler row (empty prompt, as generation_batches pads a short batch) takes no part in
  the gate quantile or the deferral rate: both match a by-hand count over the three real rows."""
  env, b = _env(), _batch(0)
  b = b.replace(prompt_mask=b.prompt_mask.at[3].set(0))
  w = 0.3 * jax.random.normal(jax.random.key(4), (CONFIG.hidden_size,))
  eta, table = co_llm.calibrate(pair, [b], w, lambda outs: [0.0], env=env)
  alone = co_llm.decode(pair, b, w, eta=1.0, env=env)
  n = np.asarray(alone.lengths)
  gates = np.concatenate([np.asarray(alone.extras["gate"])[i, :n[i]] for i in range(3)])
  for r in table[1:]:
    assert r["eta"] == pytest.approx(float(np.quantile(gates, 1 - r["rate"])))
    out = co_llm.decode(pair, b, w, eta=r["eta"], env=env)
    m, d = np.asarray(out.lengths), np.asarray(out.extras["deferred"])
    want = sum(int(d[i, :m[i]].sum()) for i in range(3)) / int(m[:3].sum())
    assert r["deferral"] == pytest.approx(want)


class _CharTok:
  def decode(self, ids):
    return "".join(chr(65 + int(i) % 26) for i in ids)


def test_co_llm_job_end_to_end_through_main_on_bigbench_rows(tmp_path):
  """The job as `main` runs it, at toy sizes on the config's BIG-bench task names (past tense and
  plural; the rows tests/conftest.py writes): a tiny random base (byte tokenizer, `tiny:0`) and
  its two 3-step specialists (the base's and the assistant's). (The real SmolLM2 pair runs the
  Co-LLM decode in the notebook test; the full embedded job, configs/co_llm_bigbench.py, takes
  about 13 minutes on 2 cores.)"""
  from configs_loader import load_config
  from single_multi import main

  c = load_config("co_llm_bigbench.py")
  c.base = "tiny:0"
  c.assistant_steps, c.train.steps, c.train.batch_size, c.train.init_epochs = 3, 3, 4, 1
  c.assistant_examples, c.base_examples = 8, 8
  c.train_examples, c.val_examples, c.test_examples, c.batch_size = 16, 8, 8, 8
  c.max_new_tokens = 4
  out = main.run(c, str(tmp_path))
  assert set(out["summary"]) == {"base", "assistant", "random_deferral", "weak_supervision",
                                 "trained_base", "co_llm"}
  assert out["summary"]["base"]["deferral"] == 0 and out["summary"]["assistant"]["deferral"] == 1
  assert out["summary"]["trained_base"]["deferral"] == 0
  # Per family: the share of that family's generated tokens the assistant wrote; the overall rate
  # is their token-weighted mean, so it lies between them.
  for name, s in out["summary"].items():
    assert set(s["per_task_deferral"]) == set(c.assistant_subjects + c.base_subjects)
    assert min(s["per_task_deferral"].values()) <= s["deferral"] + 1e-9
    assert s["deferral"] <= max(s["per_task_deferral"].values()) + 1e-9
  assert set(out["summary"]["base"]["per_task_deferral"].values()) == {0}
  assert set(out["summary"]["assistant"]["per_task_deferral"].values()) == {1}
  assert all(r["n"] == 8 for r in out["summary"].values())
  assert out["rows"] == {"assistant": 8, "base": 8, "train": 16, "validation": 8, "test": 8}
  assert set(out["composition"]["base"]) == set(c.base_subjects)
  # train.base='gate': the base is not trained, so the trained base is the base.
  assert out["summary"]["trained_base"] == out["summary"]["base"]
  for other in ("base", "assistant", "trained_base", "random_deferral", "weak_supervision"):
    d = out["paired"][f"co_llm_vs_{other}"]
    want = out["summary"]["co_llm"]["score"] - out["summary"][other]["score"]
    assert d["delta"] == pytest.approx(want) and d["ci95"][0] <= d["delta"] <= d["ci95"][1]
  assert len(out["calibration"]["co_llm"]) == 10
  for r in out["calibration"]["co_llm"] + out["calibration"]["weak_supervision"]:
    assert 0 <= r["ci95"][0] <= r["score"] <= r["ci95"][1] <= 1  # Each rate's bootstrap CI.
  for name in ("table.txt", "results.json", "traces.jsonl", "traces.html", "calibration.png"):
    assert (tmp_path / name).exists()
  params, w, eta = co_llm.load(tmp_path / "checkpoint")
  assert eta == pytest.approx(out["eta"]["co_llm"]) and w.shape == (32,)
  for role in ("assistant", "base"):  # The cached specialists.
    assert len(list(tmp_path.glob(f"{role}-*/config.json"))) == 1
  assert main.run(c, str(tmp_path))["summary"] == out["summary"]  # Rerun: reused, same result.
  c.evaluate_test = False  # Choosing a setting: validation only, no test score anywhere.
  chosen = main.run(c, str(tmp_path / "validation_only"))
  assert chosen["validation"] == out["validation"] and chosen["eta"] == out["eta"]
  assert not {"summary", "paired", "baselines"} & set(chosen)
  assert not (tmp_path / "validation_only" / "table.txt").exists()


def test_co_llm_job_fields_are_checked_before_anything_loads(monkeypatch):
  from configs_loader import load_config
  from single_multi import co_llm_run, evolve
  from single_multi.models import loading
  monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded a model"))
  for field, value, message in [
      ("val_fraction", 1.5, "val_fraction=1.5 is not allowed: give a number in (0, 1)"),
      ("train.base", "fulll", "train.base='fulll' is not allowed: give 'full', 'lora' or 'gate'"),
      ("train.init", "c", "train.init='c' is not allowed: give 'a', 'b' or 'none'"),
      ("train.steps", -1, "train.steps=-1 is not allowed: give an integer >= 0 (0: train.epochs)"),
      ("train.schedule", "cosin", "train.schedule='cosin' is not allowed"),
      ("assistant_examples", 0, "assistant_examples=0 is not allowed"),
      ("base_examples", 0, "base_examples=0 is not allowed"),
      ("specialist_lora_rank", -1, "specialist_lora_rank=-1 is not allowed: give an integer >= 0"),
      ("task", "bigbench:", "names no BIG-bench task")]:
    c = load_config("co_llm_bigbench.py")
    *parents, leaf = field.split(".")
    target = c
    for p in parents:
      target = target[p]
    target[leaf] = value
    with pytest.raises((evolve.ConfigError, ValueError), match=message.replace("(", r"\(")
                       .replace(")", r"\)")):
      co_llm_run.run(c, "/nonexistent/co_llm")
