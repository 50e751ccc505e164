"""KV-cached decoding against full forwards of HF's PyTorch model; samplers on constructed logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, left_padded_batch

import single_multi as sm
from single_multi import decoding

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from conftest import make_hf_model

  ref = make_hf_model("llama_gqa_untied")
  path = tmp_path_factory.mktemp("tiny")
  ref.save_pretrained(path)
  return ref, sm.load(str(path), tokenizer=False)


def _decode(model, ids, mask, **kw):
  kw.setdefault("max_new_tokens", 8)
  return sm.decode(model.params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0),
                   config=model.config, **kw)


@pytest.mark.parametrize("unstack", [False, True])
def test_cached_decode_rows_match_full_forward_of_growing_sequence(tiny, unstack):
  """Each step's log-prob row equals HF's full forward over prompt + tokens generated so far."""
  ref, model = tiny
  ids, mask = left_padded_batch(seed=0, length=16)
  out = _decode(model, ids, mask, return_rows=True, unstack=unstack)
  tokens, rows = np.asarray(out.tokens), np.asarray(out.rows)
  full_ids = np.concatenate([ids, tokens], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
  logits = hf_logits(ref, full_ids, full_mask)
  P = ids.shape[1]
  for step in range(tokens.shape[1]):
    expected = jax.nn.log_softmax(logits[:, P - 1 + step])
    assert np.abs(rows[:, step] - np.asarray(expected)).max() <= TOL
  # Greedy picks the argmax of each row, and `logprobs` is the chosen entry of the row.
  np.testing.assert_array_equal(tokens, rows.argmax(-1))
  np.testing.assert_allclose(np.asarray(out.logprobs),
                             np.take_along_axis(rows, tokens[..., None], -1)[..., 0], atol=1e-6)


def test_left_padded_batch_gives_the_tokens_of_each_prompt_alone(tiny):
  _, model = tiny
  ids, mask = left_padded_batch(seed=1, length=16)
  batched = np.asarray(_decode(model, ids, mask, max_new_tokens=10).tokens)
  for row in range(ids.shape[0]):
    real = ids[row][mask[row].astype(bool)]
    alone_ids, alone_mask = sm.left_pad([real.tolist()], pad_id=0, length=len(real))
    alone = np.asarray(_decode(model, alone_ids, alone_mask, max_new_tokens=10).tokens)[0]
    np.testing.assert_array_equal(batched[row], alone)


def test_stop_tokens_end_each_sequence_on_its_own(tiny):
  _, model = tiny
  ids, mask = left_padded_batch(seed=2, length=16)
  free = np.asarray(_decode(model, ids, mask, max_new_tokens=10).tokens)
  stop = int(free[0, 3])
  first = [int(np.argmax(r == stop)) if (r == stop).any() else None for r in free]
  out = _decode(model, ids, mask, max_new_tokens=10, stop_ids=(stop,), pad_id=-1)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for row, f in enumerate(first):
    if f is None:
      assert lengths[row] == 10
      np.testing.assert_array_equal(tokens[row], free[row])
    else:
      assert lengths[row] == f + 1
      np.testing.assert_array_equal(tokens[row, :f + 1], free[row, :f + 1])
      assert (tokens[row, f + 1:] == -1).all()
      assert (np.asarray(out.logprobs)[row, f + 1:] == 0).all()


def test_per_sequence_limits(tiny):
  _, model = tiny
  ids, mask = left_padded_batch(seed=3, length=16)
  out = _decode(model, ids, mask, max_new_tokens=8, pad_id=-1,
                limits_b=jnp.asarray([2, 8, 5], jnp.int32))
  np.testing.assert_array_equal(np.asarray(out.lengths), [2, 8, 5])
  assert (np.asarray(out.tokens)[0, 2:] == -1).all() and (np.asarray(out.tokens)[2, 5:] == -1).all()


def test_low_temperature_equals_greedy_and_seeds_reproduce(tiny):
  _, model = tiny
  ids, mask = left_padded_batch(seed=4, length=16)
  greedy = np.asarray(_decode(model, ids, mask).tokens)
  cold = np.asarray(_decode(model, ids, mask, sampler=sm.Sampling(temperature=1e-4)).tokens)
  np.testing.assert_array_equal(cold, greedy)
  hot = sm.Sampling(temperature=2.0)
  draws = [np.asarray(sm.decode(model.params, jnp.asarray(ids), jnp.asarray(mask),
                                jax.random.key(seed), config=model.config, sampler=hot,
                                max_new_tokens=8).tokens) for seed in (7, 7, 8)]
  np.testing.assert_array_equal(draws[0], draws[1])
  assert not np.array_equal(draws[0], draws[2])


# -------------------------------------------------------------------------------------------------
# Samplers on constructed logits.


def _draw(sampler, logits, n=20000, seed=0):
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  return np.asarray(sampler(batch, jax.random.key(seed)))


def test_top_k_only_emits_the_k_largest():
  logits = np.log(np.array([0.05, 0.3, 0.02, 0.25, 0.18, 0.2]))
  tokens = _draw(sm.Sampling(top_k=3), logits)
  assert set(np.unique(tokens)) == {1, 3, 5}
  freq = np.bincount(tokens, minlength=6) / len(tokens)
  np.testing.assert_allclose(freq[[1, 3, 5]], np.array([0.3, 0.25, 0.2]) / 0.75, atol=0.02)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
  probs = np.array([0.15, 0.5, 0.05, 0.3])  # Sorted: 0.5, 0.3 | 0.15, 0.05.
  tokens = _draw(sm.Sampling(top_p=0.8), np.log(probs))
  assert set(np.unique(tokens)) == {1, 3}
  freq = np.bincount(tokens, minlength=4) / len(tokens)
  np.testing.assert_allclose(freq[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.02)
  # Just above 0.8 the third token joins the nucleus.
  assert set(np.unique(_draw(sm.Sampling(top_p=0.81), np.log(probs)))) == {0, 1, 3}


def test_top_k_and_top_p_combine_and_temperature_flattens():
  probs = np.array([0.4, 0.3, 0.2, 0.1])
  both = _draw(sm.Sampling(top_k=3, top_p=0.6), np.log(probs))
  assert set(np.unique(both)) == {0, 1}  # top-3 renormalised: 0.44, 0.33 reach 0.6.
  hot = np.bincount(_draw(sm.Sampling(temperature=100.0), np.log(probs)), minlength=4) / 20000
  np.testing.assert_allclose(hot, 0.25, atol=0.02)


def test_greedy_and_bad_sampler_settings():
  assert (_draw(sm.Greedy(), np.log([0.1, 0.6, 0.3]), n=4) == 1).all()
  with pytest.raises(ValueError, match="use Greedy"):
    sm.Sampling(temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    sm.Sampling(top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    sm.Sampling(top_k=-1)


def test_left_pad_and_buckets():
  assert [decoding.bucket_length(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  assert [decoding.bucket_length(n, fine=True) for n in (1, 16, 17, 24, 25, 96, 97)] == [
      16, 16, 24, 24, 32, 96, 128]
  ids, mask = sm.left_pad([[5, 6, 7], [8]], pad_id=0)
  assert ids.shape == (2, 16)
  np.testing.assert_array_equal(ids[:, -3:], [[5, 6, 7], [0, 0, 8]])
  np.testing.assert_array_equal(mask.sum(1), [3, 1])
  with pytest.raises(ValueError, match="more than the padded length"):
    sm.left_pad([[1, 2, 3]], pad_id=0, length=2)


def test_api_edge_cases_fail_clearly_before_any_compute(tmp_path):
  import single_multi as sm
  from single_multi.models import loading
  with pytest.raises(ValueError, match="temperature must be > 0"):
    decoding.Sampling(temperature=float("nan"))
  with pytest.raises(loading.LoadError, match=r"give tiny:<seed>"):
    sm.load("tiny:abc")
  model = sm.load("tiny:0")
  assert decoding.generate(model, [], max_new_tokens=4) == []
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
    decoding.generate(model, ["hi"], max_new_tokens=0)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got -2"):
    decoding.decode(model.params, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
                    jax.random.key(0), config=model.config, max_new_tokens=-2)
  context = model.config.max_position_embeddings
  with pytest.raises(ValueError, match=f"exceeds the model's context of {context} tokens"):
    decoding.generate(model, ["x" * context], max_new_tokens=4)
  with pytest.raises(TypeError, match="cannot be saved"):
    sm.save_hf(tmp_path / "out", model.config, model.params, tokenizer=model.tokenizer)
  assert not (tmp_path / "out").exists()  # Refused before anything was written.
