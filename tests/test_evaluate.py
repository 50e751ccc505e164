"""Evaluation runner on tiny random models: scoring kernels against a hand computation, pools
against single models, bad-row accounting, records, bootstrap intervals."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from single_multi import decoding, evaluate, pool as pool_lib
from single_multi.data import common, pipeline
from single_multi.models import tiny, transformer


CONFIG = tiny.CONFIG
Tok = tiny.ByteTokenizer
_model = tiny.model


def _examples():
  exs = [common.Example(f"s/{i}", "s" if i % 2 else "t", f"Question {i}" + "?" * (i % 5),
                        ("yes", "no", "maybe")[: 2 + i % 2], i % 2,
                        (("yes", "no")[i % 2],)) for i in range(9)]
  exs.append(common.Example("s/bad", "s", "Broken?", ("a", "b"), 5, (),
                            "answer index 5 out of range for 2 choices"))
  return exs


def _hand_logprob(params, prompt_ids, option_ids):
  seq = jnp.asarray([prompt_ids + option_ids], jnp.int32)
  logits, _ = transformer.forward(params, seq, CONFIG)
  logp = jax.nn.log_softmax(logits[0], axis=-1)
  P = len(prompt_ids)
  return float(sum(logp[P - 1 + j, t] for j, t in enumerate(option_ids)))


def test_choice_logprobs_match_hand_computation_both_modes():
  model = _model(0)
  prompter = pipeline.Prompter(model.tokenizer)
  exs = _examples()[:5]
  batch = next(iter(pipeline.loglik_batches(exs, prompter, batch_size=8)))
  params_n = pool_lib.stack([model.params])
  args = (params_n, batch["tokens"], batch["mask"], batch["choices"], batch["choice_mask"],
          batch["owner"])
  shared = np.asarray(evaluate.choice_logprobs(*args, config=CONFIG, share_prefix=True))[0]
  full = np.asarray(evaluate.choice_logprobs(*args, config=CONFIG, share_prefix=False))[0]
  checked = 0
  for r, (row, c) in enumerate(zip(batch["owner"], batch["slot"])):
    if c < 0:
      continue
    ex = exs[batch["index"][row]]
    want = _hand_logprob(model.params, prompter.ids(ex, with_options=False),
                         prompter.choice_ids(ex)[c])
    assert shared[r] == pytest.approx(want, abs=1e-4)
    assert full[r] == pytest.approx(want, abs=1e-4)
    checked += 1
  assert checked == sum(len(ex.choices) for ex in exs if not ex.problem)


@pytest.mark.parametrize("method", ["loglik", "generate"])
def test_pool_scores_every_model_like_alone(method, tmp_path):
  models = [_model(0), _model(1)]
  pool = pool_lib.from_models(models, ["m0", "m1"])
  exs = _examples()
  kw = dict(method=method, batch_size=4, max_new_tokens=6, progress=False)
  together = evaluate.evaluate(pool, exs, prompter=pipeline.Prompter(Tok()),
                               output_dir=tmp_path, **kw)
  for name, model in zip(pool.names, models):
    alone = evaluate.evaluate(model, exs, prompter=pipeline.Prompter(Tok()), **kw)
    mine = [r for r in together.records if r["model"] == name]
    for a, b in zip(mine, alone.records):
      assert a["id"] == b["id"] and a["prediction"] == b["prediction"]
      assert np.allclose(a["output"], b["output"], atol=1e-4) if method == "loglik" \
          else a["output"] == b["output"]
  # Two models, nine valid rows each; the bad row is listed, not scored.
  s = together.summary
  assert s["n_examples"] == 10 and s["n_scored"] == 9 and s["n_excluded"] == 1
  assert s["excluded"] == [{"id": "s/bad", "problem": "answer index 5 out of range for 2 choices"}]
  assert "excluded from the denominator" in s["excluded_note"]
  assert "s/bad" in together.table()
  lines = (tmp_path / "records.jsonl").read_text().splitlines()
  assert len(lines) == 18 and {json.loads(l)["model"] for l in lines} == {"m0", "m1"}
  assert json.loads((tmp_path / "summary.json").read_text())["n_scored"] == 9
  for name in pool.names:
    key = "accuracy" if method == "loglik" else "score"
    mine = [r["score"] for r in together.records if r["model"] == name]
    assert s["models"][name][key]["mean"] == pytest.approx(np.mean(mine))
    assert s["models"][name][key]["n"] == 9


def test_generated_answers_are_scored_by_the_task_metric():
  mc = common.Example("a", "s", "Q?", ("red", "blue", "green"), 1, ("blue",))
  assert evaluate.score_generated(mc, "The answer is (B).", "exact_match")["score"] == 1.0
  assert evaluate.score_generated(mc, "It is green.", "exact_match")["score"] == 0.0
  gen = common.Example("b", "s", "Sort: b a", targets=("a b", "a, b"))
  assert evaluate.score_generated(gen, " A, b. ", "exact_match")["score"] == 1.0
  num = common.Example("c", "gsm8k", "How much?", targets=("1,000",))
  assert evaluate.score_generated(num, "It costs $1,000 in total.", "numeric")["score"] == 1.0
  assert evaluate.score_generated(num, "#### 999", "numeric")["score"] == 0.0


def test_singles_decode_with_the_shared_head_as_with_whole_prompts(monkeypatch):
  """The singles' evaluation prefills the prompts' shared head once per batch: the same records
  as decoding the whole prompts (the head disabled), and the split keeps its label."""
  pool = pool_lib.from_models([_model(0), _model(1)], names=["a", "b"])
  prompter = pipeline.Prompter(pool.tokenizer)
  exs = [e for e in _examples() if not e.problem]
  assert len(pipeline.shared_prefix([prompter.ids(e) for e in exs])) > 0
  kw = dict(prompter=prompter, split="dev", batch_size=4, max_new_tokens=6, progress=False)
  headed = evaluate.evaluate(pool, exs, **kw)
  monkeypatch.setattr(pipeline, "shared_prefix", lambda prompts: [])
  whole = evaluate.evaluate(pool, exs, **kw)
  key = lambda r: (r["model"], r["id"], r["output_ids"], r["score"])
  assert sorted(map(key, headed.records)) == sorted(map(key, whole.records))
  assert headed.summary["split"] == whole.summary["split"] == "dev"


def test_bootstrap_ci():
  assert evaluate.bootstrap_ci([1.0] * 20) == (1.0, 1.0)
  x = [0.0, 1.0] * 200
  lo, hi = evaluate.bootstrap_ci(x, samples=2000, seed=3)
  half = 1.96 * np.sqrt(0.25 / len(x))  # Normal approximation: 0.049.
  assert lo == pytest.approx(0.5 - half, abs=0.01) and hi == pytest.approx(0.5 + half, abs=0.01)
  assert evaluate.bootstrap_ci(x, seed=3) == evaluate.bootstrap_ci(x, seed=3)
  # Paired: b = a except 40 of 400 rows where a is right and b wrong. The difference's interval is
  # the one of a 0/1 variable with mean 0.1 (sd 0.3), far narrower than two unpaired intervals.
  a = np.asarray(x)
  b = a.copy()
  b[np.flatnonzero(a == 1)[:40]] = 0.0
  lo, hi = evaluate.paired_bootstrap_ci(a, b, samples=2000, seed=3)
  half = 1.96 * np.sqrt(0.1 * 0.9 / len(a))  # 0.029.
  assert lo == pytest.approx(0.1 - half, abs=0.01) and hi == pytest.approx(0.1 + half, abs=0.01)
  with pytest.raises(ValueError, match="same rows"):
    evaluate.paired_bootstrap_ci(a, b[:-1])


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="unknown method"):
    evaluate.evaluate(_model(0), _examples(), prompter=pipeline.Prompter(Tok()), method="vote")


def test_baselines_and_answer_positions_against_a_hand_count():
  E = common.Example
  rows = [E("a/0", "a", "q0", ("x", "y", "z"), 0, ("x",)),
          E("a/1", "a", "q1", ("x", "y", "z"), 1, ("y",)),
          E("a/2", "a", "q2", ("x", "y"), 1, ("y",)),
          E("b/0", "b", "q3", ("x", "y", "z", "w"), 1, ("y", "w")),  # Two correct options.
          E("b/1", "b", "q4", ("x", "y"), 7, (), "bad row"),
          E("g/0", "g", "say y", targets=("y",))]
  dev = [E("d/0", "a", "d0", ("x", "y"), 1, ("y",)), E("d/1", "b", "d1", ("x", "y"), 1, ("y",)),
         E("d/2", "a", "d2", ("x", "y"), 0, ("x",))]
  base = evaluate.baselines(rows, dev, "dev")
  # Valid MC rows: a/0, a/1, a/2, b/0. Chance: (1/3 + 1/3 + 1/2 + 2/4) / 4 = 5/12.
  assert base["mc_rows"] == 4 and base["chance"] == pytest.approx(5 / 12)
  # Gold letters A, B, B, B: majority B at 3/4. Dev's most common gold is B (2 of 3):
  # "always B" is right on a/1, a/2 and b/0 (B is one of its two correct options).
  assert base["majority_class"] == {"letter": "B", "rate": 0.75}
  assert base["position"] == {"letter": "B", "accuracy": 0.75} and base["position_from"] == "dev"
  # Per subject: a's dev rows are B and A (a tie: the first, A, wins); b has one row.
  assert base["by_subject"]["a"]["position"] == {"letter": "A", "accuracy": pytest.approx(1 / 3)}
  assert base["by_subject"]["b"]["chance"] == 0.5 and set(base["by_subject"]) == {"a", "b", "g"}
  # g's generated answer: chance 0; always "y" (its only gold answer) is right.
  gen = {"rows": 1, "chance": 0.0, "majority_answer": {"answer": "y", "rate": 1.0}}
  assert base["by_subject"]["g"] == {"generation": gen} and base["generation"] == gen
  records = [{"model": "m", "choices": ["x", "y"], "prediction": p, "subject": "a"}
             for p in ("A", "A", "B", None)] + [{"model": "m", "prediction": "y", "subject": "g"}]
  assert evaluate.answer_positions(records) == {"A": 0.5, "B": 0.25, "none": 0.25}
  # No MC row: no MC baseline.
  assert evaluate.baselines([rows[-1]], dev, "dev") == {"generation": gen,
                                                        "by_subject": {"g": {"generation": gen}}}
  assert evaluate.baselines([rows[-2]], dev, "dev") == {}  # No valid row at all.


def test_records_show_the_options_as_asked():
  ex = common.shuffle_options(common.Example("s/0", "s", "Pick", ("yes", "no", "maybe"), 2,
                                             ("maybe",)), 0)
  result = evaluate.evaluate(_model(0), [ex], prompter=pipeline.Prompter(Tok()),
                             max_new_tokens=3, progress=False, reference=[ex])
  rec = result.records[0]
  assert rec["choices"] == list(ex.choices) and rec["option_order"] == list(ex.option_order)
  assert rec["target"] == "ABC"[ex.choices.index("maybe")]
  assert result.summary["baselines"]["position"]["letter"] == rec["target"]
  assert "position" in result.table() and "answers" in result.table()


def test_prompts_over_the_context_are_refused_naming_the_example():
  import dataclasses
  model = _model(0)
  short = dataclasses.replace(model, config=dataclasses.replace(model.config,
                                                                max_position_embeddings=24))
  exs = _examples()
  with pytest.raises(common.DataError, match=r"the prompt of .* has \d+ tokens; with "
                                             r"max_new_tokens=8 it exceeds the model's context "
                                             r"of 24 tokens"):
    evaluate.evaluate(short, exs, prompter=pipeline.Prompter(model.tokenizer), max_new_tokens=8,
                      progress=False)


def test_generation_baselines_chance_zero_and_the_majority_answer_by_hand():
  rows = [common.Example("g/0", "g", "q0", targets=("walked",)),
          common.Example("g/1", "g", "q1", targets=("Walked.",)),  # Normalises to "walked".
          common.Example("g/2", "g", "q2", targets=("ran",)),
          common.Example("h/0", "h", "q3", targets=("cats", "cat")),
          common.Example("m/0", "m", "q4", ("x", "y"), 1, ("y",)),
          common.Example("g/3", "g", "", targets=("ran",), problem="empty question")]
  b = evaluate.baselines(rows, rows, "dev")
  # Always "walked": right on g/0 and g/1 of the 4 valid generated-answer rows.
  assert b["generation"] == {"rows": 4, "chance": 0.0,
                             "majority_answer": {"answer": "walked", "rate": 0.5}}
  assert b["mc_rows"] == 1 and b["chance"] == 0.5 and b["position_from"] == "dev"
  assert b["by_subject"]["g"] == {"generation": {"rows": 3, "chance": 0.0, "majority_answer": {
      "answer": "walked", "rate": pytest.approx(2 / 3)}}}
  assert b["by_subject"]["h"]["generation"]["majority_answer"] == {"answer": "cats", "rate": 1.0}
  assert "generation" not in b["by_subject"]["m"]
  only = evaluate.baselines(rows[:3], rows[:3], "dev")
  assert "mc_rows" not in only and "position_from" not in only and only["generation"]["rows"] == 3


def test_a_kept_evaluation_is_read_not_decoded_and_any_change_of_its_inputs_decodes(
    tmp_path, monkeypatch):
  pool = pool_lib.from_models([_model(0), _model(1)], ["m0", "m1"])
  exs = _examples()
  kw = dict(prompter=pipeline.Prompter(Tok()), method="generate", batch_size=4, max_new_tokens=6,
            progress=False, memo=tmp_path / "memo")
  first = evaluate.evaluate(pool, exs, key=jax.random.key(1), **kw)
  assert "memo" not in first.summary and len(list((tmp_path / "memo").iterdir())) == 1
  decodes = []
  real = pool_lib.decode_each
  monkeypatch.setattr(pool_lib, "decode_each",
                      lambda *a, **k: decodes.append(1) or real(*a, **k))

  # The same evaluation (another key: greedy decoding does not use it) is read.
  again = evaluate.evaluate(pool, exs, key=jax.random.key(2), output_dir=tmp_path / "out", **kw)
  assert decodes == [] and again.summary["memo"]
  assert again.records == first.records and again.summary["models"] == first.summary["models"]
  assert [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").open()] == \
      first.records

  def decoded(model, rows, **changes):
    decodes.clear()
    result = evaluate.evaluate(model, rows, **(kw | {"key": jax.random.key(1)} | changes))
    return bool(decodes), result

  # One element of one leaf of the params: decoded again, as a fresh evaluation would.
  leaves, treedef = jax.tree.flatten(pool.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(1e-3)
  nudged = pool_lib.Pool(pool.config, jax.tree.unflatten(treedef, leaves), pool.names,
                         pool.tokenizer)
  hit, result = decoded(nudged, exs)
  fresh = evaluate.evaluate(nudged, exs, **(kw | {"memo": None, "key": jax.random.key(1)}))
  assert hit and result.records == fresh.records
  # A row's gold answer, the token budget, the prompt format: each decodes again.
  regold = [dataclasses.replace(e, targets=("maybe",)) if e.id == "s/0" else e for e in exs]
  assert decoded(pool, regold)[0]
  assert decoded(pool, exs, max_new_tokens=5)[0]
  assert decoded(pool, exs, prompter=pipeline.Prompter(
      Tok(), pipeline.PromptConfig(mc_instruction="Pick one letter.")))[0]
  # Sampling: the key is part of the evaluation; the same key is read.
  hot = {"sampler": decoding.Sampling(temperature=1.0)}
  assert decoded(pool, exs, **hot)[0] and not decoded(pool, exs, **hot)[0]
  assert decoded(pool, exs, **hot, key=jax.random.key(3))[0]


def test_tree_digest_sees_every_bit_position_and_python_leaf():
  from single_multi import eval_memo
  tree = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "best": 1,
          "rng": jax.random.key(0), "bf": jnp.ones((4,), jnp.bfloat16)}
  base = eval_memo.tree_digest(tree)
  assert eval_memo.tree_digest(dict(tree)) == base
  flipped = jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(tree["w"], jnp.uint32).at[1, 2].add(1), jnp.float32)
  changes = [{"w": flipped}, {"w": tree["w"][:, ::-1]}, {"w": tree["w"].reshape(3, 2)},
             {"best": 2}, {"rng": jax.random.key(1)}, {"bf": tree["bf"].at[3].set(2)}]
  digests = {eval_memo.tree_digest(tree | c) for c in changes}
  assert base not in digests and len(digests) == len(changes)
