"""Our functional decoder against Hugging Face transformers' PyTorch models (the reference)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIGS, hf_logits, left_padded_batch, torch

import single_multi as sm
from single_multi.models import transformer

FP32_TOL = 1e-4  # Max abs logit difference, fp32 (fixed; never loosened).
BF16_REL_TOL = 0.03  # bf16 vs the fp32 reference, as a fraction of the largest |logit|.


def _ours(model, ids, mask):
  logits, _ = sm.forward(model.params, jnp.asarray(ids), model.config, mask_bt=jnp.asarray(mask))
  return np.asarray(logits)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers_on_left_padded_batch(name, hf_dir):
  ref_model, path = hf_dir(name)
  ids, mask = left_padded_batch(seed=1, length=40)  # 40 > the Llama-3 original context of 16.
  model = sm.load(str(path), tokenizer=False)
  ours, ref = _ours(model, ids, mask), hf_logits(ref_model, ids, mask)
  real = mask.astype(bool)
  assert np.abs(ours - ref)[real].max() <= FP32_TOL


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_untied", "gemma"])
def test_bf16_logits_close_to_fp32_reference(name, hf_dir):
  ref_model, path = hf_dir(name)
  ids, mask = left_padded_batch(seed=2, length=32)
  model = sm.load(str(path), dtype=jnp.bfloat16, tokenizer=False)
  assert model.params["layers"]["q"].dtype == jnp.bfloat16
  ours, ref = _ours(model, ids, mask), hf_logits(ref_model, ids, mask)
  real = mask.astype(bool)
  assert np.abs(ours - ref)[real].max() <= BF16_REL_TOL * np.abs(ref).max()


def test_llama3_rope_scaling_is_exercised(hf_dir):
  """The parity test above would fail if llama3 rope scaling were ignored."""
  ref_model, path = hf_dir("llama3_rope_tied_bias")
  ids, mask = left_padded_batch(seed=1, length=40)
  model = sm.load(str(path), tokenizer=False)
  unscaled = dataclasses.replace(model.config, rope_type="default")
  wrong = np.asarray(sm.forward(model.params, jnp.asarray(ids), unscaled,
                                mask_bt=jnp.asarray(mask))[0])
  assert np.abs(wrong - hf_logits(ref_model, ids, mask))[mask.astype(bool)].max() > 100 * FP32_TOL


@pytest.mark.parametrize("name", ["llama_gqa_untied", "mistral_sliding", "gemma"])
def test_left_padding_does_not_change_logits(name, hf_dir):
  _, path = hf_dir(name)
  model = sm.load(str(path), tokenizer=False)
  ids, mask = left_padded_batch(seed=3, length=20)
  batched = _ours(model, ids, mask)
  for row in range(ids.shape[0]):
    real = mask[row].astype(bool)
    alone = _ours(model, ids[row:row + 1, real], np.ones((1, real.sum()), np.int32))
    np.testing.assert_allclose(batched[row, real], alone[0], atol=FP32_TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa_untied", "mistral_sliding", "qwen2_sliding_layers"])
def test_cached_chunks_match_full_forward(name, hf_dir):
  """Prefill a prefix into the KV cache, then feed the rest in chunks of 1 and 3 tokens."""
  ref_model, path = hf_dir(name)
  model = sm.load(str(path), tokenizer=False)
  ids, mask = left_padded_batch(seed=4, length=24)
  ref = hf_logits(ref_model, ids, mask)
  cache = sm.init_cache(model.config, ids.shape[0], ids.shape[1])
  pieces, start = [], 0
  for size in [13, 1, 3, 1, 6]:
    chunk = slice(start, start + size)
    logits, cache = sm.forward(model.params, jnp.asarray(ids[:, chunk]), model.config,
                               mask_bt=jnp.asarray(mask[:, chunk]), cache=cache)
    pieces.append(np.asarray(logits))
    start += size
  assert start == ids.shape[1] and int(cache["end"]) == ids.shape[1]
  got = np.concatenate(pieces, axis=1)
  assert np.abs(got - ref)[mask.astype(bool)].max() <= FP32_TOL


def test_hidden_states_feed_the_lm_head(hf_dir):
  ref_model, path = hf_dir("qwen2_untied")
  model = sm.load(str(path), tokenizer=False)
  ids, mask = left_padded_batch(seed=5, length=12)
  hidden, _ = sm.hidden_states(model.params, jnp.asarray(ids), model.config,
                               mask_bt=jnp.asarray(mask))
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos), output_hidden_states=True).hidden_states[-1]
  real = mask.astype(bool)
  assert np.abs(np.asarray(hidden) - ref.numpy())[real].max() <= FP32_TOL
  logits = transformer.lm_head(model.params, hidden, model.config)
  np.testing.assert_array_equal(np.asarray(logits), _ours(model, ids, mask))


def test_init_params_structure_matches_loaded_checkpoint(hf_dir):
  _, path = hf_dir("llama3_rope_tied_bias")
  model = sm.load(str(path), tokenizer=False)
  fresh = sm.init_params(model.config, jax.random.key(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(model.params)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, model.params)


@pytest.mark.parametrize("name", ["llama_gqa_untied", "mistral_sliding", "qwen2_sliding_layers"])
def test_attention_in_query_blocks_matches_transformers(name, hf_dir, monkeypatch):
  """Long prefills attend a block of queries at a time (`transformer.SCORES_LIMIT`); forced on
  here (blocks of 8 queries), the logits still match transformers on a left-padded batch with
  sliding windows, both in one forward and in a cached prefill of 16 tokens then 8 more."""
  monkeypatch.setattr(transformer, "SCORES_LIMIT", 0)
  monkeypatch.setattr(transformer, "QUERY_BLOCKS", (8,))
  ref_model, path = hf_dir(name)
  model = sm.load(str(path), tokenizer=False)
  ids, mask = left_padded_batch(seed=5, length=40)
  real = mask.astype(bool)
  ref = hf_logits(ref_model, ids, mask)
  jax.clear_caches()  # The module constants are read at trace time.
  assert np.abs(_ours(model, ids, mask) - ref)[real].max() <= FP32_TOL
  cache = sm.init_cache(model.config, ids.shape[0], ids.shape[1])
  pieces = []
  for chunk in (slice(0, 16), slice(16, 24), slice(24, 40)):
    logits, cache = sm.forward(model.params, jnp.asarray(ids[:, chunk]), model.config,
                               mask_bt=jnp.asarray(mask[:, chunk]), cache=cache)
    pieces.append(np.asarray(logits))
  assert np.abs(np.concatenate(pieces, axis=1) - ref)[real].max() <= FP32_TOL
