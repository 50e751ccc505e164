"""Collaboration strategies on tiny random models: identities, hand computations, token-space
prompts, routers on separable labels, merges against hand-made tensors and transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, left_padded_batch, make_hf_model

import single_multi as sm
from single_multi import collab, decoding, pool as pool_lib
from single_multi.collab import core, hetero, merge, routers, templates, text_level, token_level
from single_multi.data import common, pipeline
from single_multi.models import transformer
from single_multi.models.loading import Model

from test_evaluate import CONFIG, _model

M = 6  # New tokens per answer.


@pytest.fixture(scope="module")
def pool():
  return pool_lib.from_models([_model(s) for s in range(3)], ["m0", "m1", "m2"])


def _examples(n=4):
  return [common.Example(f"s/{i}", "s", f"Q{i}" + "?" * i, ("yes", "no"), i % 2, ()) for i in
          range(n)]


@pytest.fixture(scope="module")
def batch(pool):
  prompter = pipeline.Prompter(pool.tokenizer)
  data = next(iter(pipeline.generation_batches(_examples(), prompter, batch_size=4)))
  return core.batch_from(data)


def _env(pool, name, cfg=None, **kw):
  return collab.make_env(pool, name, cfg, max_new_tokens=M, **kw)


def _decode(params, batch, env):
  return decoding.decode(params, batch.prompt, batch.prompt_mask, jax.random.key(0),
                         return_rows=True, **env.decode_kw)


def test_registry_has_the_papers_seven_and_the_comparisons():
  for name in ("trained_router", "graph_router", "multiagent_refine", "llm_blender",
               "multiagent_finetuning", "logit_fusion", "dare_ties", "linear", "ties", "co_llm",
               "proxy_tuning", "contrastive_decoding", "mixture_of_agents", "single"):
    assert name in collab.REGISTRY, name
  with pytest.raises(collab.StrategyError, match="unknown strategy 'nope'"):
    collab.get("nope")
  with pytest.raises(collab.StrategyError, match="heterogeneous"):
    collab.check_pool("logit_fusion", homogeneous=False)
  collab.check_pool("llm_blender", homogeneous=False)  # Text level: fine.


def test_single_equals_plain_decode(pool, batch):
  env = _env(pool, "single", return_rows=True)
  out = collab.run(pool, "single", batch, env=env, cfg=collab.get("single").Config(model=2))
  want = _decode(pool.member(2), batch, env)
  np.testing.assert_array_equal(out.tokens, want.tokens)
  np.testing.assert_allclose(out.rows, want.rows, atol=1e-5)


def test_logit_fusion_identities_and_hand_computation(pool, batch):
  env = _env(pool, "logit_fusion", return_rows=True)
  same = pool_lib.Pool(pool.config, pool_lib.stack([pool.member(1)] * 3), ("a", "b", "c"),
                       pool.tokenizer)
  alone = _decode(pool.member(1), batch, env)
  out = collab.run(same, "logit_fusion", batch, env=env)
  np.testing.assert_array_equal(out.tokens, alone.tokens)
  np.testing.assert_allclose(out.rows, alone.rows, atol=1e-4)
  cfg = collab.get("logit_fusion").Config(weights=(1.0, 0.0, 0.0))
  first = collab.run(pool, "logit_fusion", batch, env=env, cfg=cfg)
  np.testing.assert_array_equal(first.tokens, _decode(pool.member(0), batch, env).tokens)
  # Uniform fusion, first step: log_softmax(mean_i logits_i) at the prompt's last position.
  for space in ("logits", "logprobs"):
    cfg = collab.get("logit_fusion").Config(space=space)
    fused = collab.run(pool, "logit_fusion", batch, env=env, cfg=cfg)
    logits, _ = pool_lib.forward(pool.params, batch.prompt, pool.config,
                                 mask_bt=batch.prompt_mask)
    last = np.asarray(logits[:, :, -1], np.float64)
    if space == "logprobs":
      last = last - np.log(np.exp(last - last.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
          - last.max(-1, keepdims=True)
    mean = last.mean(0)
    want = mean - mean.max(-1, keepdims=True)
    want -= np.log(np.exp(want).sum(-1, keepdims=True))
    np.testing.assert_allclose(fused.rows[:, 0], want, atol=1e-4)
    np.testing.assert_array_equal(fused.tokens[:, 0], want.argmax(-1))


def _gate(pool, scale=0.05, seed=3):
  return scale * jax.random.normal(jax.random.key(seed), (pool.config.hidden_size,))


def test_co_llm_eta_extremes_and_compose_mixture(pool, batch):
  w = _gate(pool)
  env = _env(pool, "co_llm", return_rows=True)
  Cfg = collab.get("co_llm").Config
  never = collab.run(pool, "co_llm", batch, env=env, cfg=Cfg(eta=1.0), state={"w_defer": w})
  np.testing.assert_array_equal(never.tokens, _decode(pool.member(0), batch, env).tokens)
  assert not never.extras["deferred"].any()
  always = collab.run(pool, "co_llm", batch, env=env, cfg=Cfg(eta=0.0), state={"w_defer": w})
  np.testing.assert_array_equal(always.tokens, _decode(pool.member(1), batch, env).tokens)
  live = np.arange(M)[None] < np.asarray(always.lengths)[:, None]
  assert (np.asarray(always.extras["deferred"]) == live).all()
  # compose, first step, by hand: log((1 - p) P_base + p P_asst), p = sigmoid(<w, h_last>).
  comp = collab.run(pool, "co_llm", batch, env=env, cfg=Cfg(eta=0.0, mode="compose"),
                    state={"w_defer": w})
  h, _ = transformer.hidden_states(pool.member(0), batch.prompt, pool.config,
                                   mask_bt=batch.prompt_mask)
  p = np.asarray(jax.nn.sigmoid(h[:, -1] @ w), np.float64)
  logits, _ = pool_lib.forward(pool.params, batch.prompt, pool.config, mask_bt=batch.prompt_mask)
  last = np.asarray(logits[:, :, -1], np.float64)
  probs = np.exp(last - last.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.log((1 - p)[:, None] * probs[0] + p[:, None] * probs[1])
  np.testing.assert_allclose(comp.rows[:, 0], want, atol=1e-4)
  np.testing.assert_allclose(comp.extras["gate"][:, 0], p, atol=1e-5)
  assert comp.tokens[:, 0].tolist() == want.argmax(-1).tolist()
  with pytest.raises(collab.StrategyError, match="trained gate"):
    collab.run(pool, "co_llm", batch, env=env)


def test_co_llm_with_two_assistants_picks_the_most_probable_one_above_eta(pool, batch):
  """Base m0, assistants (m1, m2), gate rows W [2, D]: P(Z) = softmax([0, <W_1, h>, <W_2, h>]).
  First step by hand (float64): in "defer" mode the token is the argmax of the most probable
  assistant's distribution where its probability exceeds eta, else the base's; "compose" is
  log sum_k P(Z = k) P_k."""
  W = jnp.stack([_gate(pool, 0.5, 3), _gate(pool, 0.5, 4)])
  env = _env(pool, "co_llm", return_rows=True)
  Cfg = collab.get("co_llm").Config
  h, _ = transformer.hidden_states(pool.member(0), batch.prompt, pool.config,
                                   mask_bt=batch.prompt_mask)
  z = np.concatenate([np.zeros((h.shape[0], 1)), np.asarray(h[:, -1] @ W.T, np.float64)], -1)
  choice = np.exp(z - z.max(-1, keepdims=True))
  choice /= choice.sum(-1, keepdims=True)
  logits, _ = pool_lib.forward(pool.params, batch.prompt, pool.config, mask_bt=batch.prompt_mask)
  last = np.asarray(logits[:, :, -1], np.float64)
  probs = np.exp(last - last.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)  # [3, B, V]
  pick = 1 + choice[:, 1:].argmax(-1)
  p_pick = choice[np.arange(len(pick)), pick]
  eta = float(np.median(p_pick))  # Some rows defer, some do not.
  out = collab.run(pool, "co_llm", batch, env=env, cfg=Cfg(assistant=(1, 2), eta=eta),
                   state={"w_defer": W})
  defer = p_pick > eta
  assert 0 < defer.sum() < len(defer)
  want = np.where(defer, probs[pick, np.arange(len(pick))].argmax(-1), probs[0].argmax(-1))
  assert out.tokens[:, 0].tolist() == want.tolist()
  assert np.asarray(out.extras["choice"])[:, 0].tolist() == np.where(defer, pick, 0).tolist()
  np.testing.assert_allclose(out.extras["gate"][:, 0], p_pick, atol=1e-5)
  comp = collab.run(pool, "co_llm", batch, env=env,
                    cfg=Cfg(assistant=[1, 2], eta=0.0, mode="compose"), state={"w_defer": W})
  np.testing.assert_allclose(comp.rows[:, 0], np.log(np.einsum("bk,kbv->bv", choice, probs)),
                             atol=1e-4)
  never = collab.run(pool, "co_llm", batch, env=env, cfg=Cfg(assistant=(1, 2), eta=1.0),
                     state={"w_defer": W})
  np.testing.assert_array_equal(never.tokens, _decode(pool.member(0), batch, env).tokens)
  with pytest.raises(collab.StrategyError, match="2 assistants"):
    collab.run(pool, "co_llm", batch, env=env, cfg=Cfg(assistant=(1, 2)),
               state={"w_defer": W[0]})
  with pytest.raises(ValueError, match="other pool members"):
    Cfg(base=1, assistant=(1, 2))


def test_proxy_tuning_without_a_difference_is_the_base(pool, batch):
  env = _env(pool, "proxy_tuning")
  cfg = collab.get("proxy_tuning").Config(base=2, expert=1, anti_expert=1)
  out = collab.run(pool, "proxy_tuning", batch, env=env, cfg=cfg)
  np.testing.assert_array_equal(out.tokens, _decode(pool.member(2), batch, env).tokens)


def test_contrastive_decoding_first_token_by_hand(pool, batch):
  cfg = collab.get("contrastive_decoding").Config(kind="li")
  env = _env(pool, "contrastive_decoding", cfg, return_rows=True)
  out = collab.run(pool, "contrastive_decoding", batch, env=env, cfg=cfg)
  logits, _ = pool_lib.forward(pool.params, batch.prompt, pool.config, mask_bt=batch.prompt_mask)
  lp = np.asarray(jax.nn.log_softmax(logits[:, :, -1]), np.float64)
  plausible = lp[0] >= lp[0].max(-1, keepdims=True) + np.log(0.1)
  want = np.where(plausible, lp[0] - lp[1], -np.inf).argmax(-1)
  assert out.tokens[:, 0].tolist() == want.tolist()


def test_reference_logit_contrastive_first_token_by_hand(pool, batch):
  """logit_logit_contrastive.py: dev means (m0 .5, m1 .9, m2 .1): top m1, bottom m2, logits
  m1 + 0.2 (m1 - m2), as rows the log-softmax of that."""
  scores = np.asarray([[1, 0] * 5, [1] * 9 + [0], [1] + [0] * 9], np.float32)
  env = _env(pool, "contrastive_decoding", return_rows=True)
  dev = collab.DevData(batch, scores)
  state = collab.fit(pool, "contrastive_decoding", dev, env=env)
  np.testing.assert_allclose(state["weights"], [0.0, 1.2, -0.2], rtol=1e-6)
  assert token_level.contrastive_weights([0.5, 0.5, 0.1], 1, 0.2).tolist() == pytest.approx(
      [1.2, 0.0, -0.2])  # A tie: the lower index ranks first.
  with pytest.raises(collab.StrategyError, match="fitted on dev"):
    collab.run(pool, "contrastive_decoding", batch, env=env)
  out = collab.run(pool, "contrastive_decoding", batch, env=env, state=state)
  logits, _ = pool_lib.forward(pool.params, batch.prompt, pool.config, mask_bt=batch.prompt_mask)
  lg = np.asarray(logits[:, :, -1], np.float64)
  want = lg[1] + 0.2 * (lg[1] - lg[2])
  assert out.tokens[:, 0].tolist() == want.argmax(-1).tolist()
  np.testing.assert_allclose(out.rows[:, 0], jax.nn.log_softmax(want), atol=2e-4)


# -------------------------------------------------------------------------------------------------
# Token-space text exchange.


def test_pack_concatenates_segments_left_padded():
  a = (jnp.asarray([[5, 6, 0], [7, 0, 0]]), jnp.asarray([2, 1]))
  b = (jnp.asarray([[8, 9], [1, 2]]), jnp.asarray([1, 2]))
  tokens, mask = core.pack([a, core.piece([3], 2), b], 6, pad_id=0)
  assert tokens.tolist() == [[0, 0, 5, 6, 3, 8], [0, 0, 7, 3, 1, 2]]
  assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
  tokens, mask = core.pack([a, core.piece([3], 2), b], 3, pad_id=0)  # Overflow keeps the end.
  assert tokens.tolist() == [[6, 3, 8], [3, 1, 2]] and mask.tolist() == [[1, 1, 1]] * 2


def _answer(out_tokens, lengths, stop_ids, i, b):
  n = int(core.answer_lengths(out_tokens[i], lengths[i], stop_ids)[b])
  return np.asarray(out_tokens[i, b, :n]).tolist()


def test_multiagent_refine_zero_rounds_is_independent_answers_then_summary(pool, batch):
  Cfg = collab.get("multiagent_refine").Config
  env = _env(pool, "multiagent_refine")
  out = collab.run(pool, "multiagent_refine", batch, env=env, cfg=Cfg(rounds=0, summarizer=2))
  each = pool_lib.decode_each(pool.params, batch.prompt, batch.prompt_mask,
                              jax.random.split(jax.random.key(0))[1], **env.decode_kw)
  np.testing.assert_array_equal(out.extras["answers"][0], each.tokens)
  # The summary prompt, built on the host from text pieces and the answers, then decoded by 2.
  pieces = env.template("summarize")
  q_tokens, q_len = core.right_align(batch.question, batch.question_mask)
  for b in range(batch.prompt.shape[0]):
    ids = list(pieces[0]) + np.asarray(q_tokens[b, :q_len[b]]).tolist()
    for i in range(3):
      ids += list(pieces[i + 1]) + _answer(each.tokens, each.lengths, env.stop_ids, i, b)
    ids += list(pieces[-1])
    summary = np.asarray(out.extras["summary_prompt"][b])
    assert summary[-len(ids):].tolist() == ids and (summary[:-len(ids)] == env.pad_id).all()
    want = decoding.decode(pool.member(2), jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                           jax.random.fold_in(jax.random.key(0), 1), **env.decode_kw)
    assert out.tokens[b].tolist() == want.tokens[0].tolist()


def test_refine_prompt_and_critic_prompt_are_the_references_for_a_3_model_round():
  """The user messages, for model 1 of 3, as the reference's code writes them
  (text_multiagent_refine.py; text_multiagent_finetuning.py, _build_critic_prompt_with_summary
  and _summarize_other_answers), copied here by hand."""
  answers = ["a0", "a1", "a2"]

  def built(name):
    return hetero.fill_text(templates._BUILDERS[name](3, None),
                            ["Q", *templates.order_answers(name, answers, 1)])

  team = ("You are part of a team of AI assistants collaborating to answer the user's question. "
          "Each assistant provides their own answer: use their answers to ")
  assert built("refine") == (
      team + "refine and improve your own answer.\n\nQuestion: Q\n\nYour previous answer: a1"
      "\n\nOther assistants' answers:\n- a0\n- a2\n\nPlease provide a refined answer to the "
      "question.")
  assert built("summarize") == (
      team + "create a final, comprehensive answer.\n\nQuestion: Q\n\nAssistants' answers:\n"
      "- a0\n- a1\n- a2\n\nPlease provide a final, comprehensive answer to the question.")
  assert built("critic") == (
      "Question: Q\nSummary of other assistants' answers:\na0\n\na2\nYour previous answer: a1"
      "\nPlease provide a refined and correct answer to the question.")
  # The reference's round counts: refine 3 generations (2 refinements), debate 2 (1 critic).
  assert collab.get("multiagent_refine").Config().rounds == 2
  assert collab.get("multiagent_finetuning").Config().rounds == 1


def test_refine_prompts_in_the_program_hold_own_answer_then_the_others(pool, batch):
  env = _env(pool, "multiagent_refine")
  out = collab.run(pool, "multiagent_refine", batch, env=env,
                   cfg=collab.get("multiagent_refine").Config(rounds=1))
  first = out.extras["answers"][0]
  each = pool_lib.decode_each(pool.params, batch.prompt, batch.prompt_mask,
                              jax.random.split(jax.random.key(0))[1], **env.decode_kw)
  np.testing.assert_array_equal(first, each.tokens)
  pieces = env.template("refine")
  q_tokens, q_len = core.right_align(batch.question, batch.question_mask)
  for i in range(3):
    for b in range(batch.prompt.shape[0]):
      prompt = np.asarray(out.extras["refine_prompts"][i, b]).tolist()
      ids = list(pieces[0]) + np.asarray(q_tokens[b, :q_len[b]]).tolist()
      for piece, j in zip(pieces[1:], [i] + [j for j in range(3) if j != i]):
        ids += list(piece) + _answer(each.tokens, each.lengths, env.stop_ids, j, b)
      ids += list(pieces[-1])
      assert prompt[-len(ids):] == ids and all(t == env.pad_id for t in prompt[:-len(ids)])
  # The refinement decodes the rows without the template's head, prefilled once per model
  # (`text_level.answer_all`): the same answers as decoding the whole prompts.
  whole = [text_level.fill(env, "refine", (q_tokens, q_len),
                           templates.order_answers("refine", text_level._answers(each, env), i))
           for i in range(3)]
  np.testing.assert_array_equal(jnp.stack([w[0] for w in whole]), out.extras["refine_prompts"])
  again = pool_lib.decode_each(pool.params, jnp.stack([w[0] for w in whole]),
                               jnp.stack([w[1] for w in whole]), jax.random.key(1),
                               **env.decode_kw)
  np.testing.assert_array_equal(out.extras["answers"][1], again.tokens)
  whole_env = dataclasses.replace(env, prefill_heads=False)  # What benchmarks/shared_head.py times.
  unsplit = collab.run(pool, "multiagent_refine", batch, env=whole_env,
                       cfg=collab.get("multiagent_refine").Config(rounds=1))
  np.testing.assert_array_equal(unsplit.extras["answers"], out.extras["answers"])


def test_blender_ranking_and_pairwise_preferences(pool, batch):
  pref = np.zeros((3, 3, 1), np.float32)  # Candidate 2 beats both others from both sides.
  pref[2, 0] = pref[2, 1] = 1.0
  pref[0, 2] = pref[1, 2] = -1.0
  pref[0, 1], pref[1, 0] = 0.5, -0.2  # 0 beats 1 as A and as B.
  order, _ = text_level.rank_candidates(jnp.asarray(pref))
  assert order[0].tolist() == [2, 0, 1]
  env = _env(pool, "llm_blender")
  out = collab.run(pool, "llm_blender", batch, env=env)
  order2, _ = text_level.rank_candidates(out.extras["preferences"])
  np.testing.assert_array_equal(out.extras["ranking"], order2)
  # One pairwise verdict by hand: compare prompt for (A=answer 0, B=answer 1), row 1.
  ranker = pool.member(0)
  pieces = env.template("compare")
  q_tokens, q_len = core.right_align(batch.question, batch.question_mask)
  each = pool_lib.decode_each(pool.params, batch.prompt, batch.prompt_mask,
                              jax.random.split(jax.random.key(0))[1], **env.decode_kw)
  b = 1
  ids = (list(pieces[0]) + np.asarray(q_tokens[b, :q_len[b]]).tolist() + list(pieces[1])
         + _answer(each.tokens, each.lengths, env.stop_ids, 0, b) + list(pieces[2])
         + _answer(each.tokens, each.lengths, env.stop_ids, 1, b) + list(pieces[3]))
  logits, _ = transformer.forward(ranker, jnp.asarray([ids]), pool.config)
  lp = jax.nn.log_softmax(logits[0, -1])
  (a,), (bb,) = env.template("labels")
  assert float(out.extras["preferences"][0, 1, b]) == pytest.approx(float(lp[a] - lp[bb]),
                                                                    abs=1e-4)


def test_majority_vote_and_debate_output(pool, batch):
  tokens = jnp.asarray([[[4, 5, 9]], [[4, 6, 9]], [[4, 5, 7]]])
  winner, votes = text_level.majority_vote(tokens, jnp.asarray([[2], [2], [2]]))
  assert winner.tolist() == [0] and votes[:, 0].tolist() == [2, 1, 2]
  env = _env(pool, "multiagent_finetuning")
  out = collab.run(pool, "multiagent_finetuning", batch, env=env,
                   cfg=collab.get("multiagent_finetuning").Config(rounds=1))
  final = out.extras["answers"][-1]
  np.testing.assert_array_equal(out.extras["final"][0], final)
  for b, w in enumerate(out.extras["winner"].tolist()):
    assert out.tokens[b].tolist() == final[w, b].tolist()


def test_vote_on_extracted_answers_as_the_reference():
  vote = text_level.vote
  assert vote(["B", "B", "A"]) == 0
  assert vote(["C", "A", "C"]) == 0 and vote(["A", "C", "C"]) == 1
  assert vote(["B", "A"]) == 1  # A tie: the smallest answer (the reference sorts them).
  assert vote([None, None, "C"]) == 2  # No extracted answer: no vote.
  assert vote([None, None]) == 0
  assert vote([12.0, 13.0, 12.0]) == 0 and vote([13.0, 12.0, 12.0]) == 1


def test_vote_picks_two_answers_that_agree_in_substance_not_in_tokens(pool):
  """Three free-form replies to a numeric question, all different token sequences: the in-program
  token-exact vote keeps agent 0's "13"; the vote on extracted numbers picks "12", given by two."""
  ex = common.Example("s/0", "s", "How many?", (), 0, ("12",))
  texts = ["13", "The answer is 12.", "12 apples in total"]
  ids = [pool.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  width = max(map(len, ids))
  tokens = np.asarray([[row + [0] * (width - len(row))] for row in ids], np.int32)  # [3, 1, M]
  lengths = np.asarray([[len(row)] for row in ids], np.int32)
  winner, _ = text_level.majority_vote(jnp.asarray(tokens), jnp.asarray(lengths))
  assert winner.tolist() == [0]
  spec = collab.get("multiagent_finetuning")
  out = core.Output(jnp.asarray(tokens[0]), jnp.asarray(lengths[0]), None,
                    {"final": (tokens, lengths)})
  from single_multi import evaluate
  got, got_len = evaluate.selected(spec, out, [ex], [0], pool.tokenizer, "numeric",
                                   spec.Config(), None)
  assert pool.tokenizer.decode(got[0, 0, :got_len[0, 0]]) == "The answer is 12."
  # Multiple choice: the letters extracted, whatever the wording.
  mc = common.Example("s/1", "s", "Capital of France?", ("Rome", "Paris", "Oslo"), 1, ())
  keys = [evaluate.answer_key(mc, t, "exact_match") for t in ("C", "(B) Paris", "I pick B.")]
  assert keys == ["C", "B", "B"] and text_level.vote(keys) == 1


def test_mixture_of_agents_runs_as_one_program(pool, batch):
  env = _env(pool, "mixture_of_agents")
  out = collab.run(pool, "mixture_of_agents", batch, env=env)
  assert out.tokens.shape == (4, M) and out.extras["answers"].shape == (2, 3, 4, M)


# -------------------------------------------------------------------------------------------------
# Routers.


def _router_data(pool, n, seed):
  """Two kinds of queries (all 'a's vs all 'z's): model 0 is right on 'a', model 1 on 'z'."""
  rng = np.random.default_rng(seed)
  kinds = rng.integers(0, 2, n)
  exs = [common.Example(f"r/{seed}/{i}", "r", ("a" if k == 0 else "z") * int(rng.integers(3, 12)),
                        ("yes", "no"), 0, ()) for i, k in enumerate(kinds)]
  prompter = pipeline.Prompter(pool.tokenizer)
  data = next(iter(pipeline.generation_batches(exs, prompter, batch_size=n)))
  order = data["index"]
  kinds = kinds[order]
  scores = np.stack([kinds == 0, kinds == 1, np.zeros(n, bool)]).astype(np.float32)
  return core.batch_from(data), kinds, scores


# The LM router at a tiny model's pace (the reference's lr 1e-5 over 5 epochs moves a random
# 2-layer model too little to learn anything in a test).
LM_ROUTER = dict(kind="lm", lora_rank=8, lora_dropout=0.0, lm_learning_rate=3e-3, epochs=40,
                 rows_per_step=16, micro_batch=16)


# The reference's graph router at a faster pace, with enough validation queries that the best
# validation F1 is not reached by chance in the first epochs (4 queries at the 0.8/0.1 split).
GRAPH_ROUTER = dict(reference_learning_rate=1e-2, split=(0.5, 0.5), epochs=100)


@pytest.mark.parametrize("name,cfg", [
    ("trained_router", {"kind": "head"}), ("trained_router", LM_ROUTER),
    ("graph_router", GRAPH_ROUTER), ("graph_router", GRAPH_ROUTER | {"test_graph": "dev"}),
    ("graph_router", {"kind": "fast"})],
    ids=["head_router", "lm_router", "graph_router", "graph_router_dev_graph", "fast_graph"])
def test_router_learns_separable_labels_and_returns_the_chosen_answer(pool, name, cfg):
  dev_batch, _, scores = _router_data(pool, 48, 0)
  test_batch, kinds, _ = _router_data(pool, 16, 1)
  cfg = collab.get(name).Config(**cfg)
  env = _env(pool, name, cfg)
  state = collab.fit(pool, name, collab.DevData(dev_batch, scores), env=env, cfg=cfg)
  out = collab.run(pool, name, test_batch, env=env, cfg=cfg, state=state)
  choice = np.asarray(out.extras["choice"])
  assert np.mean(choice == kinds) >= 0.95, (choice, kinds)
  if cfg == collab.get("trained_router").Config(**LM_ROUTER):  # It names the model in words.
    replies = [pool.tokenizer.decode(r, skip_special_tokens=True)
               for r in np.asarray(out.extras["router_reply"])]
    assert all(r.startswith(f"Model {c + 1}") for r, c in zip(replies, choice)), replies
  rows = np.arange(16)
  np.testing.assert_array_equal(out.tokens, np.asarray(out.extras["answers"])[choice, rows])
  each = pool_lib.decode_each(pool.params, test_batch.prompt, test_batch.prompt_mask,
                              jax.random.key(0), **env.decode_kw)
  np.testing.assert_array_equal(out.tokens, np.asarray(each.tokens)[choice, rows])
  # `route` is the same choice without decoding any answer.
  routed, _ = collab.route(pool, name, test_batch, env=env, cfg=cfg, state=state)
  np.testing.assert_array_equal(np.asarray(routed), choice)


def test_trained_router_head_l2_shrinks_the_weights(pool):
  """l2 adds l2/2 |w|^2 to the head's loss: a moderate penalty keeps the two kinds of queries
  apart with smaller weights; a huge one leaves the bias alone, every query to one model."""
  dev_batch, kinds, scores = _router_data(pool, 48, 0)
  fitted = {}
  for l2 in (0.0, 1.0, 1e6):
    cfg = routers.TrainedRouterConfig(kind="head", labels="tied", l2=l2)
    env = _env(pool, "trained_router", cfg)
    state = collab.fit(pool, "trained_router", collab.DevData(dev_batch, scores), env=env,
                       cfg=cfg)
    choice, _ = collab.route(pool, "trained_router", dev_batch, env=env, cfg=cfg, state=state)
    fitted[l2] = float(jnp.linalg.norm(state["head"]["w"])), np.asarray(choice)
  assert fitted[1e6][0] < 1e-4 * fitted[0.0][0] and len(set(fitted[1e6][1])) == 1
  assert fitted[1.0][0] < fitted[0.0][0]
  np.testing.assert_array_equal(fitted[1.0][1], kinds)  # Model 0 on 'a', model 1 on 'z'.
  with pytest.raises(ValueError, match="l2 must be >= 0"):
    routers.TrainedRouterConfig(kind="head", l2=-1.0)


def test_a_router_scored_from_the_members_answers_equals_its_own_decoding(pool, tmp_path):
  """evaluate(members=singles): the router only routes (its features from the prompts split at
  their shared head) and each row keeps its chosen member's answer and score; greedy, that is
  exactly what it decodes itself from the whole prompts. A non-router ignores them."""
  from single_multi import evaluate
  dev_batch, _, scores = _router_data(pool, 48, 0)
  cfg = routers.TrainedRouterConfig(kind="head")
  state = collab.fit(pool, "trained_router", collab.DevData(dev_batch, scores),
                     env=_env(pool, "trained_router", cfg), cfg=cfg)
  rng = np.random.default_rng(3)
  exs = [common.Example(f"t/{i}", "t", ("a" if i % 2 else "z") * int(rng.integers(3, 12)),
                        targets=("aa",)) for i in range(10)]
  kw = dict(prompter=pipeline.Prompter(pool.tokenizer), batch_size=4, max_new_tokens=M,
            progress=False)
  # The routing runs the prompts' shared head once (`routers.batch_features`); the router's own
  # decoding below reads the whole prompts.
  assert pipeline.shared_prefix([kw["prompter"].ids(e) for e in exs])
  singles = evaluate.evaluate(pool, exs, **kw)
  own = evaluate.evaluate(pool, exs, strategy="trained_router", strategy_cfg=cfg,
                          strategy_state=state, **kw)
  taken = evaluate.evaluate(pool, exs, strategy="trained_router", strategy_cfg=cfg,
                            strategy_state=state, members=singles, **kw)
  key = lambda r: (r["id"], r["output"], r["output_ids"], r["score"])
  assert sorted(map(key, taken.records)) == sorted(map(key, own.records))
  routed = {r["routed_to"] for r in taken.records}
  assert len(routed) > 1, routed  # Not one member's answers throughout: the lookup is per row.
  assert taken.summary["models"] == own.summary["models"]
  fused = evaluate.evaluate(pool, exs, strategy="logit_fusion", members=singles, **kw)
  assert all("routed_to" not in r for r in fused.records)
  with pytest.raises(ValueError, match="no answers to 2 of these examples"):
    evaluate.evaluate(pool, exs + [common.Example(f"u/{i}", "t", "b" * (i + 3), targets=("b",))
                                   for i in range(2)], strategy="trained_router",
                      strategy_cfg=cfg, strategy_state=state, members=singles, **kw)


def test_graph_router_conv_and_f1_by_hand():
  """GeneralConv (torch_geometric's defaults): x_i + sum over visible edges j -> i of
  (W_msg x_j + b_msg + W_edge e + b_edge); and sklearn's macro F1."""
  conv = routers.GeneralConv(2)
  x = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
  src, dst = jnp.asarray([0, 1, 0]), jnp.asarray([2, 2, 1])
  e = jnp.asarray([[1.0], [2.0], [3.0]])
  visible = jnp.asarray([True, True, False])
  params = conv.init(jax.random.key(0), x, src, dst, e, visible)
  p = jax.tree.map(np.asarray, params["params"])
  msg = lambda j, ej: x[j] @ p["lin_msg"]["kernel"] + p["lin_msg"]["bias"] + ej @ p[
      "lin_edge"]["kernel"] + p["lin_edge"]["bias"]
  want = np.asarray(x).copy()
  want[2] += msg(0, np.asarray([1.0])) + msg(1, np.asarray([2.0]))  # Edge 0 -> 1 is hidden.
  np.testing.assert_allclose(conv.apply(params, x, src, dst, e, visible), want, rtol=1e-6)
  # Macro F1 over the classes present: class 0: P 1/2, R 1 -> 2/3; class 1: P 1, R 1/3 -> 1/2;
  # class 2: predicted once, never true -> 0.
  assert routers.macro_f1(np.asarray([0, 1, 1, 1]), np.asarray([0, 0, 1, 2])) == pytest.approx(
      (2 / 3 + 0.5 + 0) / 3)


def test_lm_router_parses_replies_as_the_reference():
  """The highest model number the reply contains wins; none: a random model."""
  model = _model(0)
  tok = model.tokenizer
  digits = jnp.asarray(routers.digit_table(tok, model.config.vocab_size, 3))
  replies = ["Model 2", "1 or 3", "Model 1 then", "none", "Model 22"]
  ids = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
  width = max(map(len, ids)) + 2
  tokens = np.asarray([r + tok("3", add_special_tokens=False)["input_ids"] * (width - len(r))
                       for r in ids], np.int32)  # A "3" after each reply's end: not read.
  lengths = np.asarray([len(r) for r in ids], np.int32)
  choice = routers.named_model(jnp.asarray(tokens), jnp.asarray(lengths), digits,
                               jax.random.key(0))
  assert choice.tolist()[:3] == [1, 2, 0] and choice.tolist()[4] == 1
  none = [int(routers.named_model(jnp.asarray(tokens[3:4]), jnp.asarray(lengths[3:4]), digits,
                                  jax.random.key(k))[0]) for k in range(30)]
  assert set(none) == {0, 1, 2}


def test_lm_router_prompt_is_the_references():
  text = hetero.fill_text(templates._BUILDERS["router"](3, None), ["Q"])
  assert text == ("You are an AI assistant tasked with choosing the best model to answer the "
                  "user's question.\n\nQuestion: Q\n\nBased on your knowledge, choose the best "
                  "model (1-3) to answer the question.")


def test_router_label_tie_break():
  scores = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]], np.float32)
  # Means: m0 .5, m1 .5, m2 .5 -> equal overall; lower index wins ties. Column 3: all tie -> 0.
  assert routers.best_model_labels(scores).tolist() == [0, 1, 0, 0]
  scores = np.array([[1, 0, 0], [1, 1, 1]], np.float32)  # m1 better overall: wins the tie.
  assert routers.best_model_labels(scores).tolist() == [1, 1, 1]


# -------------------------------------------------------------------------------------------------
# Merges.


def test_dare_without_drop_is_task_arithmetic_and_ties_by_hand():
  base = {"w": jnp.zeros((4,))}
  d = jnp.asarray([[1.0, -2.0, 3.0, 0.5], [-1.0, -1.5, 2.0, 0.1], [2.0, 1.0, -4.0, 0.2]])
  params = {"w": d + 0.0}
  w = jnp.asarray([0.2, 0.3, 0.5])
  ta = merge.merge_params(params, w, base, method="task_arithmetic", lam=0.7)
  dare = merge.merge_params(params, w, base, method="dare_linear", density=1.0, lam=0.7)
  np.testing.assert_allclose(dare["w"], ta["w"], rtol=1e-6)
  np.testing.assert_allclose(ta["w"], 0.7 * (w @ d), rtol=1e-6)
  # TIES, density 0.5, uniform weights: trimmed [0,-2,3,0], [0,-1.5,2,0], [2,0,-4,0];
  # elected signs +,-,+,(+: a zero sum counts as +, no entry agrees); disjoint means 2, -1.75,
  # 2.5, 0.
  ties = merge.merge_params(params, jnp.ones(3) / 3, base, method="ties", density=0.5, lam=1.0)
  np.testing.assert_allclose(ties["w"], [2.0, -1.75, 2.5, 0.0], rtol=1e-6)
  # DARE drops about 1 - density of the entries and rescales the rest to the tensor's L1 norm
  # (mergekit's rescale), here 10000 / (entries kept).
  big = {"w": jnp.ones((2, 10000))}
  dropped = merge.merge_params(big, jnp.asarray([1.0, 0.0]), {"w": jnp.zeros(10000)},
                               method="dare_linear", density=0.3, key=jax.random.key(1))["w"]
  kept = np.asarray(dropped) != 0
  assert abs(kept.mean() - 0.3) < 0.02
  np.testing.assert_allclose(np.asarray(dropped)[kept], 10000 / kept.sum(), rtol=1e-5)
  with pytest.raises(collab.StrategyError, match="merge_base"):
    merge.merge_params(params, w, None, method="dare_ties")


def _mergekit_replica(base, xs, weights, method, density, masks=None):
  """mergekit's GTATask.execute / LinearMergeTask.execute for one tensor, in float64 numpy
  (arcee-ai/mergekit a6e4028: generalized_task_arithmetic.py, sparsify.py, registry.py)."""
  sparsify, consensus, normalize, rescale = {
      "linear": (None, None, True, False), "task_arithmetic": (None, None, False, False),
      "ties": ("magnitude", "sum", True, False), "dare_ties": ("random", "sum", False, True)
  }[method]
  w = np.asarray(weights, np.float64)
  if method == "linear":
    return sum(wi * x for wi, x in zip(w, xs)) / w.sum()
  deltas = []
  for i, x in enumerate(xs):
    delta = (x.astype(np.float32) - base.astype(np.float32)).astype(np.float64)
    if sparsify and density < 1:
      if sparsify == "magnitude":  # sparsify.magnitude: argsort descending, the top k.
        k = int(density * delta.size)
        mask = np.zeros(delta.size)
        mask[np.argsort(-np.abs(delta).reshape(-1), kind="stable")[:k]] = 1
        mask = mask.reshape(delta.shape)
      else:  # sparsify.bernoulli with the masks given.
        mask = masks[i]
      masked = delta * mask
      if rescale:  # rescaled_masked_tensor, L1.
        before, after = np.abs(delta).sum(), np.abs(masked).sum()
        if not (before < 1e-7 or after < 1e-7):
          masked = masked * (before / after)
      delta = masked
    deltas.append(delta)
  deltas = np.stack(deltas)
  wb = w.reshape((-1,) + (1,) * (deltas.ndim - 1))
  weighted = deltas * wb
  if consensus:  # get_mask(method="sum").
    majority = (weighted.sum(0) >= 0).astype(np.float64) * 2 - 1
    mask = (np.sign(weighted) == majority).astype(np.float64)
    mixed = (weighted * mask).sum(0)
    divisor = (wb * mask).sum(0)
    divisor[divisor == 0] = 1
  else:
    mixed = weighted.sum(0)
    divisor = wb.sum(0)
    divisor[np.abs(divisor) < 1e-8] = 1
  if normalize:
    mixed = mixed / divisor
  return base.astype(np.float64) + mixed


def _task_vector_pool(scale_shared=1.0, scale_own=1.0):
  """A base and 3 members = base + shared task vector + each its own, of tiny random models."""
  base = transformer.init_params(CONFIG, jax.random.key(0))
  shared = transformer.init_params(CONFIG, jax.random.key(1))
  members = [jax.tree.map(lambda b, s, o: b + scale_shared * s + scale_own * o, base, shared,
                          transformer.init_params(CONFIG, jax.random.key(10 + i)))
             for i in range(3)]
  return base, shared, pool_lib.stack(members)


@pytest.mark.parametrize("method,density", [("ties", 0.5), ("dare_ties", 0.5), ("dare_ties", 1.0),
                                            ("task_arithmetic", 1.0), ("linear", 1.0)])
def test_merge_equals_mergekit_replica(method, density):
  base, _, params_n = _task_vector_pool()
  weights = np.asarray([0.5, 0.3, 0.2])
  key = jax.random.key(3)
  masks = None
  if method == "dare_ties" and density < 1:  # The masks drawn, fed to the replica as well.
    deltas = jax.tree.map(lambda x, b: x - b[None], params_n, base)
    masks = merge.sparsity_masks(deltas, method=method, density=density, key=key)
  got = merge.merge_params(params_n, jnp.asarray(weights, jnp.float32), base, method=method,
                           density=density, key=key, masks=masks)
  paths = jax.tree_util.tree_flatten_with_path(params_n)[0]
  for (path, x), b, g in zip(paths, jax.tree.leaves(base), jax.tree.leaves(got)):
    x, b, g = np.asarray(x), np.asarray(b), np.asarray(g)
    layered = jax.tree_util.keystr(path).startswith("['layers']")
    m = None if masks is None else np.asarray(
        jax.tree.leaves(masks)[[p for p, _ in paths].index(path)])
    # A HF checkpoint's tensor is one layer's weight: the replica merges layer by layer.
    slices = range(x.shape[1]) if layered else [None]
    for layer in slices:
      sel = (lambda a: a[:, layer]) if layered else (lambda a: a)
      want = _mergekit_replica(b[layer] if layered else b, list(sel(x)), weights, method,
                               density, None if m is None else list(sel(m)))
      np.testing.assert_allclose(g[layer] if layered else g, want, atol=1e-6, rtol=0,
                                 err_msg=f"{method} {jax.tree_util.keystr(path)} {layer}")


def test_mergekit_dare_ties_moves_along_a_shared_task_vector():
  """Members sharing a task vector: merged against the true base, the merge's update (merged -
  base) follows it; against the members' mean (what a missing base used to mean) the task vectors
  sum to zero and the update is uncorrelated noise."""
  base, shared, params_n = _task_vector_pool(scale_shared=1.0, scale_own=1.0)
  w = jnp.ones(3) / 3
  flat = lambda t: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(t)])
  direction = flat(shared)

  def corr(b):
    merged = merge.merge_params(params_n, w, b, method="dare_ties", density=0.5,
                                key=jax.random.key(0))
    update = flat(merged) - flat(b)
    return float(update @ direction / np.linalg.norm(update) / np.linalg.norm(direction))

  assert corr(base) > 0.6
  assert abs(corr(jax.tree.map(lambda x: jnp.mean(x, 0), params_n))) < 0.05


def test_pso_hand_computed_steps():
  """The reference's NumericSwarm update, by hand: 1-D, 2 particles, no randomness in the
  coefficients (weight_randomness=False): weights (0.2, 0.3, 0.4, 0.05) / 0.95."""
  swarm = merge.NumericSwarm(1, 2, rng=np.random.default_rng(0), weight_randomness=False,
                             particles=[[0.0], [1.0]], velocities=[[0.5], [-0.5]])
  assert swarm.update([1.0, 2.0]) is False
  # Global best: particle 1 at 1.0; global worst: particle 0 at 0.0; personal bests: themselves.
  v0 = (0.5 * 0.2 + 0.0 * 0.3 + (1.0 - 0.0) * 0.4 + (0.0 - 0.0) * 0.05) / 0.95
  v1 = (-0.5 * 0.2 + 0.0 * 0.3 + (1.0 - 1.0) * 0.4 + (1.0 - 0.0) * 0.05) / 0.95
  np.testing.assert_allclose(swarm.velocities[0], [v0], rtol=1e-12)
  np.testing.assert_allclose(swarm.velocities[1], [v1], rtol=1e-12)
  x0, x1 = 0.0 + 0.5 * v0, 1.0 + 0.5 * v1
  np.testing.assert_allclose([swarm.particles[0][0], swarm.particles[1][0]], [x0, x1], rtol=1e-12)
  assert swarm.step_length == pytest.approx(0.475)
  # Second step: particle 0 scores 0.5 (its best stays at 0.0, score 1), particle 1 scores 3
  # (the global best moves to x1); the global worst is now particle 0's x0.
  swarm.update([0.5, 3.0])
  v0b = (v0 * 0.2 + (0.0 - x0) * 0.3 + (x1 - x0) * 0.4 + (x0 - x0) * 0.05) / 0.95
  v1b = (v1 * 0.2 + (x1 - x1) * 0.3 + (x1 - x1) * 0.4 + (x1 - x0) * 0.05) / 0.95
  np.testing.assert_allclose([swarm.particles[0][0], swarm.particles[1][0]],
                             [x0 + 0.475 * v0b, x1 + 0.475 * v1b], rtol=1e-12)
  assert swarm.step_length == pytest.approx(0.475 * 0.95)
  # A particle whose score does not beat its previous restart_patience - 1 = 2 scores restarts
  # from its personal best (particle 0's best: 0.0, scored 1.0); particle 1 keeps improving.
  swarm.update([0.7, 4.0])
  swarm.update([0.6, 5.0])
  assert swarm.particles[0][0] == 0.0
  # Termination: the global best did not improve over the last patience - 1 updates.
  stall = merge.NumericSwarm(1, 2, rng=np.random.default_rng(0), patience=2)
  assert [stall.update([1.0, 0.0]), stall.update([1.0, 0.0]), stall.update([1.0, 0.0])] == [
      False, False, True]


def test_pso_finds_the_optimum_of_a_convex_function():
  """The reference's swarm (its defaults, 25 iterations) on -(x - 0.3)^2: in 1-D it finds the
  optimum; in 3-D (5 particles) it improves on its start every time but collapses early (the
  reference's algorithm: measured median distance 0.17, in the module docstring)."""
  for dim, check in ((1, "optimum"), (3, "improves")):
    finals, starts = [], []
    for seed in range(20):
      swarm = merge.NumericSwarm(dim, 5, rng=np.random.default_rng(seed), patience=10**6)
      f = lambda x: -float(np.sum((x - 0.3) ** 2))
      starts.append(max(f(x) for x in swarm.particles))
      for _ in range(25):
        swarm.update([f(x) for x in swarm.particles])
      finals.append(swarm.global_best_score)
      assert swarm.global_best_score == pytest.approx(f(swarm.global_best))
    if check == "optimum":
      dist = np.sqrt(-np.asarray(finals))
      assert np.median(dist) < 0.01 and dist.max() < 0.1, dist
    else:
      assert all(b > a for a, b in zip(starts, finals))


def test_linear_merge_of_real_architecture_matches_transformers(tmp_path):
  hf = [make_hf_model("qwen2_untied", s) for s in (0, 1)]
  models = []
  for i, m in enumerate(hf):
    m.save_pretrained(tmp_path / str(i))
    models.append(sm.load(str(tmp_path / str(i)), tokenizer=False))
  p = pool_lib.from_models(models, ["a", "b"])
  merged = merge.merge_params(p.params, jnp.asarray([0.25, 0.75]), method="linear")
  state = {k: 0.25 * v + 0.75 * hf[1].state_dict()[k] for k, v in hf[0].state_dict().items()}
  target = make_hf_model("qwen2_untied", 2)
  target.load_state_dict(state)
  ids, mask = left_padded_batch(seed=0, length=12)
  want = hf_logits(target, ids, mask)
  got, _ = transformer.forward(merged, jnp.asarray(ids), p.config, mask_bt=jnp.asarray(mask))
  m = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(got)[m], want[m], atol=2e-4)


def test_merge_strategy_decodes_the_merged_model_and_searches_weights(pool, batch):
  env = _env(pool, "dare_ties")
  # density 1 (no trim): a continuous function of the params, so the in-program merge and this
  # one agree to rounding (a magnitude threshold could flip an entry on a 1-ulp difference).
  cfg = collab.get("ties").Config(density=1.0, weights=(0.5, 0.3, 0.2))
  base = jax.tree.map(lambda x: 0.9 * x, pool.member(0))
  with pytest.raises(collab.StrategyError, match="merge_base"):
    collab.run(pool, "ties", batch, env=env, cfg=cfg)
  out = collab.run(pool, "ties", batch, env=env, cfg=cfg, state={"base": base})
  merged = merge.merge_params(pool.params, jnp.asarray([0.5, 0.3, 0.2]), base, method="ties",
                              density=1.0)
  np.testing.assert_array_equal(out.tokens, _decode(merged, batch, env).tokens)
  # PSO: a dev score that prefers weight on model 1 moves the weights there.
  target = pool.member(1)["layers"]["q"]
  dev = collab.DevData(batch, evaluate=lambda params: -float(
      jnp.mean((params["layers"]["q"] - target) ** 2)))
  cfg = collab.get("linear").Config(search="pso", iterations=6)
  state = collab.fit(pool, "linear", dev, env=env, cfg=cfg)
  assert int(np.argmax(state["weights"])) == 1
  assert state["search"]["history"][-1] >= state["search"]["history"][0]
  # The fitted state holds the merge with its weights, computed once (equal to fp32 rounding:
  # one program fuses differently from another): decoding it gives what merging inside every
  # batch's program gives.
  for got, want in zip(jax.tree.leaves(state["merged"]), jax.tree.leaves(
      merge.merge_params(pool.params, state["weights"], method="linear"))):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  once = collab.run(pool, "linear", batch, env=env, cfg=cfg, state=state)
  per_batch = collab.run(pool, "linear", batch, env=env, cfg=cfg,
                         state={k: v for k, v in state.items() if k != "merged"})
  np.testing.assert_array_equal(once.tokens, per_batch.tokens)
  np.testing.assert_array_equal(once.tokens, _decode(state["merged"], batch, env).tokens)
  other = collab.run(pool, "linear", batch, env=env, cfg=cfg,
                     state=state | {"merged": pool.member(2)})  # What it decodes is the state's.
  np.testing.assert_array_equal(other.tokens, _decode(pool.member(2), batch, env).tokens)


# -------------------------------------------------------------------------------------------------
# Heterogeneous pools: text on the host.


def test_heterogeneous_pool_exchanges_text_and_refuses_logit_strategies(pool):
  other = dataclasses.replace(CONFIG, hidden_size=48, num_heads=6, intermediate_size=96)
  a = _model(0)
  b = Model(other, jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x,
                                transformer.init_params(other, jax.random.key(7))), a.tokenizer,
            "wide")
  with pytest.raises(pool_lib.PoolMismatchError):
    pool_lib.from_models([a, b])
  exs = _examples(3)
  with pytest.raises(collab.StrategyError, match="one vocabulary and one architecture"):
    collab.run_heterogeneous([a, b], "logit_fusion", exs)
  cfg = collab.get("multiagent_refine").Config(rounds=1, summarizer=1)
  out = collab.run_heterogeneous([a, b], "multiagent_refine", exs, cfg=cfg, max_new_tokens=M)
  prompter = pipeline.Prompter(a.tokenizer)
  first = [[t.strip() for t in decoding.generate(m, [prompter.messages(e) for e in exs],
                                                 max_new_tokens=M)] for m in (a, b)]
  for k, ex in enumerate(exs):
    assert out[k]["answers"][0] == [first[0][k], first[1][k]]
    q = pipeline.question_text(ex, pipeline.PromptConfig())
    refine = templates._BUILDERS["refine"](2, cfg)
    want_a = decoding.generate(a, [[{"role": "user", "content": hetero.fill_text(
        refine, [q, first[0][k], first[1][k]])}]], max_new_tokens=M)[0].strip()
    assert out[k]["answers"][1][0] == want_a
    last = out[k]["answers"][1]
    summary = hetero.fill_text(templates._BUILDERS["summarize"](2, cfg), [q, *last])
    assert out[k]["output"] == decoding.generate(b, [[{"role": "user", "content": summary}]],
                                                 max_new_tokens=M)[0].strip()


def test_router_tied_targets_spread_over_the_top_score():
  scores = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]], np.float32)
  np.testing.assert_array_equal(routers.tied_best_targets(scores), np.array(
      [[.5, .5, 0], [0, .5, .5], [.5, 0, .5], [1 / 3, 1 / 3, 1 / 3]], np.float32))
  # Graded scores: only the maximum counts.
  np.testing.assert_array_equal(routers.tied_best_targets(np.array([[0.2], [0.7], [0.7]])),
                                np.array([[0, .5, .5]], np.float32))
  with pytest.raises(ValueError, match="needs kind 'head'"):
    routers.TrainedRouterConfig(kind="lm", labels="tied")
  with pytest.raises(ValueError, match="'best' or 'tied'"):
    routers.TrainedRouterConfig(kind="head", labels="soft")
