"""Stacked pools: vmapped decode equals a loop over models; the combine hook; clear mismatch errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch, make_hf_model

import single_multi as sm
from single_multi import pool as pool_lib

KW = dict(max_new_tokens=8, stop_ids=(3,), pad_id=0)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
  models = []
  for seed in range(3):
    path = tmp_path_factory.mktemp(f"m{seed}")
    make_hf_model("qwen2_untied", seed).save_pretrained(path)
    models.append(sm.load(str(path), tokenizer=False))
  return models


@pytest.fixture(scope="module")
def pool(members):
  return pool_lib.from_models(members, names=["a", "b", "c"])


def _args(seed=0):
  ids, mask = left_padded_batch(seed=seed, length=16)
  return jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0)


def test_stacking_adds_a_leading_model_axis(pool, members):
  assert pool.size == 3 and pool.names == ("a", "b", "c")
  assert pool.params["layers"]["q"].shape == (3, *members[0].params["layers"]["q"].shape)
  jax.tree.map(np.testing.assert_array_equal, pool.member(1), members[1].params)


def test_vmapped_forward_equals_each_model(pool, members):
  ids, mask, _ = _args()
  logits, _ = pool_lib.forward(pool.params, ids, pool.config, mask_bt=mask)
  for i, m in enumerate(members):
    single, _ = sm.forward(m.params, ids, m.config, mask_bt=mask)
    np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(single), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", [sm.Greedy(), sm.Sampling(temperature=1.5, top_k=20)])
def test_decode_each_equals_python_loop_over_models(pool, members, sampler):
  ids, mask, rng = _args(1)
  each = pool_lib.decode_each(pool.params, ids, mask, rng, config=pool.config, sampler=sampler,
                              **KW)
  assert each.tokens.shape == (3, 3, 8)
  for i, m in enumerate(members):
    single = sm.decode(m.params, ids, mask, jax.random.fold_in(rng, i), config=m.config,
                       sampler=sampler, **KW)
    np.testing.assert_array_equal(np.asarray(each.tokens[i]), np.asarray(single.tokens))
    np.testing.assert_array_equal(np.asarray(each.lengths[i]), np.asarray(single.lengths))
    np.testing.assert_allclose(np.asarray(each.logprobs[i]), np.asarray(single.logprobs),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", [sm.Greedy(), sm.Sampling(temperature=1.5, top_k=20)])
@pytest.mark.parametrize("unstack", [True, False])
def test_decode_each_with_a_prefilled_head_equals_the_whole_prompt(pool, sampler, unstack):
  """A head every row starts with, prefilled once (`prefix_p`), the rows holding only the rest:
  the same tokens and log-probs as decoding the whole left-padded prompts, with the layers
  unstacked (CPU's default) and stacked (accelerators' default: the cache [N, L, B, ...])."""
  ids, mask, rng = _args(4)
  head = np.asarray(ids)[0, -5:-1].tolist()  # 4 tokens put in front of every row's prompt.
  rows = [head + np.asarray(ids)[b][np.asarray(mask)[b] == 1].tolist() for b in range(3)]
  rows[1] = rows[1][:6]  # One row with a single token after the head.
  whole, whole_mask = sm.left_pad(rows, 0)
  rest, rest_mask = sm.left_pad([r[4:] for r in rows], 0)
  full = pool_lib.decode_each(pool.params, jnp.asarray(whole), jnp.asarray(whole_mask), rng,
                              config=pool.config, sampler=sampler, unstack=unstack, **KW)
  split = pool_lib.decode_each(pool.params, jnp.asarray(rest), jnp.asarray(rest_mask), rng,
                               config=pool.config, sampler=sampler, prefix_p=jnp.asarray(head),
                               unstack=unstack, **KW)
  np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(full.tokens))
  np.testing.assert_array_equal(np.asarray(split.lengths), np.asarray(full.lengths))
  np.testing.assert_allclose(np.asarray(split.logprobs), np.asarray(full.logprobs), atol=1e-5,
                             rtol=0)


def test_router_features_with_a_prefilled_head_equal_the_whole_prompts(pool):
  """`routers.query_features` with the head run once (`prefix_p`), the rows holding only the
  rest: each row's mean hidden state over its whole prompt, as from the whole prompts (float32,
  1e-5), through `batch_features` as a router's routing takes a split batch."""
  from single_multi.collab import core, routers
  ids, mask, _ = _args(4)
  head = np.asarray(ids)[0, -5:-1].tolist()
  rows = [head + np.asarray(ids)[b][np.asarray(mask)[b] == 1].tolist() for b in range(3)]
  rows[1] = rows[1][:6]
  whole, whole_mask = (jnp.asarray(x) for x in sm.left_pad(rows, 0))
  rest, rest_mask = (jnp.asarray(x) for x in sm.left_pad([r[4:] for r in rows], 0))
  params = pool.member(1)
  full = routers.query_features(params, whole, whole_mask, config=pool.config)
  q = jnp.zeros((3, 1), jnp.int32)
  split = routers.batch_features(params, core.Batch(whole, whole_mask, q, q, jnp.asarray(head),
                                                    rest, rest_mask), pool.config)
  np.testing.assert_allclose(np.asarray(split), np.asarray(full), atol=1e-5, rtol=0)
  assert not np.allclose(np.asarray(full[0]), np.asarray(full[1]), atol=1e-3)  # Rows differ.


@pytest.mark.parametrize("index,unstack", [(0, True), (2, True), (2, False)])
def test_combine_take_model_i_equals_model_i_alone(pool, members, index, unstack):
  """The pool's combined decode, its layers unstacked (CPU's default) or stacked (accelerators'),
  against one model's decode (unstacked)."""
  ids, mask, rng = _args(2)
  combined = pool_lib.decode_combined(pool.params, ids, mask, rng, config=pool.config,
                                      combine=pool_lib.TakeModel(index), unstack=unstack, **KW)
  single = sm.decode(members[index].params, ids, mask, rng, config=pool.config, **KW)
  np.testing.assert_array_equal(np.asarray(combined.tokens), np.asarray(single.tokens))
  np.testing.assert_allclose(np.asarray(combined.logprobs), np.asarray(single.logprobs),
                             atol=1e-5, rtol=0)


def test_logit_average_of_identical_models_equals_the_model(members):
  same = pool_lib.from_models([members[0]] * 3)
  ids, mask, rng = _args(3)
  for space in ("logits", "logprobs"):
    fused = pool_lib.decode_combined(same.params, ids, mask, rng, config=same.config,
                                     combine=pool_lib.LogitAverage(space=space), **KW)
    single = sm.decode(members[0].params, ids, mask, rng, config=same.config, **KW)
    np.testing.assert_array_equal(np.asarray(fused.tokens), np.asarray(single.tokens))


def test_logit_average_weights_one_hot_equals_model_0(pool, members):
  ids, mask, rng = _args(4)
  fused = pool_lib.decode_combined(pool.params, ids, mask, rng, config=pool.config,
                                   combine=pool_lib.LogitAverage(weights=(1.0, 0.0, 0.0)), **KW)
  single = sm.decode(members[0].params, ids, mask, rng, config=pool.config, **KW)
  np.testing.assert_array_equal(np.asarray(fused.tokens), np.asarray(single.tokens))


def test_fused_first_row_matches_hand_computation(pool, members):
  """Row 0 of a weighted log-prob average, computed by hand from each model's own logits."""
  ids, mask, rng = _args(5)
  weights = (0.5, 0.3, 0.2)
  out = pool_lib.decode_combined(pool.params, ids, mask, rng, config=pool.config,
                                 combine=pool_lib.LogitAverage(weights=weights), return_rows=True,
                                 **KW)
  expected = 0.0
  for w, m in zip(weights, members):
    logits, _ = sm.forward(m.params, ids, m.config, mask_bt=mask)
    last = np.asarray(logits[:, -1], np.float64)
    logp = last - np.log(np.exp(last - last.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - last.max(-1, keepdims=True)
    expected = expected + w * logp
  expected = expected - np.log(np.exp(expected).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(out.rows[:, 0]), expected, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.tokens[:, 0]), expected.argmax(-1))


def test_mismatched_pools_fail_with_names(members):
  other_vocab = dataclasses.replace(members[1], config=dataclasses.replace(members[1].config,
                                                                           vocab_size=999))
  with pytest.raises(pool_lib.PoolMismatchError, match=r"a has 160 tokens, b has 999"):
    pool_lib.from_models([members[0], other_vocab], names=["a", "b"])
  other_arch = dataclasses.replace(members[1], config=dataclasses.replace(members[1].config,
                                                                          rope_theta=7.0))
  with pytest.raises(pool_lib.PoolMismatchError, match=r"rope_theta: 10000.0 vs 7.0"):
    pool_lib.from_models([members[0], other_arch], names=["a", "b"])
  with pytest.raises(ValueError, match="3 weights for a pool of 2"):
    two = pool_lib.from_models(members[:2])
    ids, mask, rng = _args(6)
    pool_lib.decode_combined(two.params, ids, mask, rng, config=two.config,
                             combine=pool_lib.LogitAverage(weights=(1.0, 0.0, 0.0)), **KW)
