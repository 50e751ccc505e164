"""Tiny random models with a byte-level tokenizer: model source `tiny:<seed>`.

For tests, the tiny config, the local multi-process launcher and quick experiments: a 2-layer
Llama (vocab 260 = 256 bytes + pad/eos/2 spare) whose weights are a seeded random init scaled up
(x4) so different inputs get clearly different scores, and a tokenizer that maps each UTF-8 byte
b to id b + 2 with a ChatML-like template. Nothing is downloaded.
"""

from __future__ import annotations

import jax

from single_multi.models import transformer
from single_multi.models.config import ModelConfig

CONFIG = ModelConfig(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                     tie_word_embeddings=False, eos_token_ids=(1,))


class ByteTokenizer:
  """Byte-level: id = byte + 2 (0 pad, 1 eos); template `<role>content</>...<assistant>`."""
  chat_template = "chatml"
  pad_token_id = 0
  eos_token_id = 1

  def apply_chat_template(self, messages, add_generation_prompt, tokenize):
    if tokenize:
      raise NotImplementedError("ByteTokenizer renders text only (tokenize=False)")
    text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
    return text + ("<assistant>" if add_generation_prompt else "")

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [2 + b for b in text.encode()]}

  def decode(self, ids, skip_special_tokens=True):
    return bytes(int(i) - 2 for i in ids if 2 <= i < 258).decode("utf-8", "replace")


def model(seed: int):
  from single_multi.models.loading import Model

  params = transformer.init_params(CONFIG, jax.random.key(seed))
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
  return Model(CONFIG, params, ByteTokenizer(), f"tiny{seed}")
