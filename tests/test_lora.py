"""LoRA: a separate param tree applied in the forward pass, checked against torch-merged weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, left_padded_batch, torch

import single_multi as sm
from single_multi.models import lora as lora_lib

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _random_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=TARGETS, seed=0):
  cfg = sm.LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
  params = lora_lib.init(model.config, cfg, jax.random.key(seed))
  # Non-zero B so the update matters (B = 0 at init).
  for i, name in enumerate(targets):
    b = params[name]["b"]
    params[name]["b"] = 0.05 * jax.random.normal(jax.random.key(100 + i), b.shape)
  return cfg, params


def _logits(model, ids, mask, lora=None, params=None):
  return np.asarray(sm.forward(params or model.params, jnp.asarray(ids), model.config,
                               mask_bt=jnp.asarray(mask), lora=lora)[0])


def test_default_config_is_the_reference_recipe():
  cfg = sm.LoraConfig()
  assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.targets) == (64, 16.0, 0.1, ("q", "k", "v", "o"))
  assert cfg.scale == 0.25


def test_zero_b_equals_base_model(hf_dir):
  _, path = hf_dir("qwen2_untied")
  model = sm.load(str(path), tokenizer=False)
  cfg = sm.LoraConfig(rank=8, alpha=16, targets=TARGETS)
  params = lora_lib.init(model.config, cfg, jax.random.key(0))
  assert all(np.all(np.asarray(p["b"]) == 0) for p in params.values())
  assert any(np.any(np.asarray(p["a"]) != 0) for p in params.values())
  ids, mask = left_padded_batch(seed=0)
  np.testing.assert_array_equal(_logits(model, ids, mask, sm.LoraState(params, cfg)),
                                _logits(model, ids, mask))


@pytest.mark.parametrize("name", ["llama_gqa_untied", "gemma"])
def test_merged_equals_unmerged(name, hf_dir):
  _, path = hf_dir(name)
  model = sm.load(str(path), tokenizer=False)
  cfg, params = _random_lora(model)
  ids, mask = left_padded_batch(seed=1)
  unmerged = _logits(model, ids, mask, sm.LoraState(params, cfg))
  merged = _logits(model, ids, mask, params=lora_lib.merge(model.params, params, cfg))
  assert np.abs(unmerged - _logits(model, ids, mask)).max() > 1e-2  # The update is not a no-op.
  assert np.abs(unmerged - merged).max() <= 1e-5


def test_unmerged_lora_matches_torch_model_with_merged_weights(hf_dir):
  """Independent reference: W + (alpha/r) A@B computed in torch, in HF's [out, in] layout."""
  ref_model, path = hf_dir("llama_gqa_untied")
  model = sm.load(str(path), tokenizer=False)
  cfg, params = _random_lora(model, rank=3, alpha=6.0)
  hf_names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
  with torch.no_grad():
    for name, p in params.items():
      a, b = np.asarray(p["a"]), np.asarray(p["b"])
      for i in range(model.config.num_layers):
        a_i = torch.tensor(a[i].reshape(-1, cfg.rank))  # [in, r]
        b_i = torch.tensor(b[i].reshape(cfg.rank, -1))  # [r, out]
        weight = ref_model.get_parameter(f"model.layers.{i}.{hf_names[name]}.weight")
        weight += cfg.scale * (a_i @ b_i).T
  ids, mask = left_padded_batch(seed=2)
  real = mask.astype(bool)
  ours = _logits(model, ids, mask, sm.LoraState(params, cfg))
  assert np.abs(ours - hf_logits(ref_model, ids, mask))[real].max() <= 1e-4


def test_dropout_only_with_an_rng(hf_dir):
  _, path = hf_dir("qwen2_untied")
  model = sm.load(str(path), tokenizer=False)
  cfg, params = _random_lora(model, dropout=0.5, targets=("q", "v"))
  ids, mask = left_padded_batch(seed=3)
  det = _logits(model, ids, mask, sm.LoraState(params, cfg))
  np.testing.assert_array_equal(det, _logits(model, ids, mask, sm.LoraState(params, cfg)))
  drop1 = _logits(model, ids, mask, sm.LoraState(params, cfg, jax.random.key(1)))
  drop1b = _logits(model, ids, mask, sm.LoraState(params, cfg, jax.random.key(1)))
  drop2 = _logits(model, ids, mask, sm.LoraState(params, cfg, jax.random.key(2)))
  np.testing.assert_array_equal(drop1, drop1b)
  assert np.abs(drop1 - det).max() > 1e-4 and np.abs(drop1 - drop2).max() > 1e-4


def test_lora_is_a_pytree_that_crosses_jit(hf_dir):
  _, path = hf_dir("gemma")
  model = sm.load(str(path), tokenizer=False)
  cfg, params = _random_lora(model, targets=("q", "o"))
  ids, mask = left_padded_batch(seed=4)
  fwd = jax.jit(sm.forward, static_argnames="config")
  jitted = fwd(model.params, jnp.asarray(ids), config=model.config, mask_bt=jnp.asarray(mask),
               lora=sm.LoraState(params, cfg))[0]
  np.testing.assert_allclose(np.asarray(jitted), _logits(model, ids, mask, sm.LoraState(params, cfg)),
                             atol=1e-5, rtol=0)


def test_bad_lora_config():
  with pytest.raises(ValueError, match=r"unknown LoRA targets \['qkv'\]"):
    sm.LoraConfig(targets=("qkv",))
  with pytest.raises(ValueError, match="rank must be positive"):
    sm.LoraConfig(rank=0)
