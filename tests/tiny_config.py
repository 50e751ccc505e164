"""A tiny Qwen2-style config and batch shared by the multi-device and multi-process workers."""

import numpy as np

import single_multi as sm

CONFIG = sm.ModelConfig(
    model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=False,
    rope_theta=10000.0)

def batch():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, CONFIG.vocab_size, (8, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  mask[5, :7] = 0
  return ids, mask
