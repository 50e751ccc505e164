"""Tiny random models with byte-level tokenizers: model sources `tiny:<seed>`, `tiny-qwen2:<seed>`.

For tests, the tiny configs, the local multi-process launcher and quick experiments: a 2-layer
Llama (vocab 260 = 256 bytes + pad/eos/2 spare) whose weights are a seeded random init scaled up
(x4) so different inputs get clearly different scores, and a tokenizer that maps each UTF-8 byte
b to id b + 2 with a ChatML-like template. `tiny-qwen2:<seed>`: a second family for heterogeneous
pools, a 2-layer Qwen2 (qkv bias, tied embeddings, wider, vocab 300) whose tokenizer maps byte b
to id b + 40 with another template, so the two families share neither ids nor prompts. Nothing is
downloaded.
"""

from __future__ import annotations

import jax

from single_multi.models import transformer
from single_multi.models.config import ModelConfig

CONFIG = ModelConfig(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                     tie_word_embeddings=False, eos_token_ids=(1,))


QWEN2_CONFIG = ModelConfig(model_type="qwen2", vocab_size=300, hidden_size=48,
                           intermediate_size=96, num_layers=2, num_heads=6, num_kv_heads=2,
                           head_dim=8, rope_theta=1000000.0, qkv_bias=True,
                           tie_word_embeddings=True, eos_token_ids=(1,))


class ByteTokenizer:
  """Byte-level: id = byte + 2 (0 pad, 1 eos); template `<role>content</>...<assistant>`."""
  chat_template = "chatml"
  pad_token_id = 0
  eos_token_id = 1
  offset = 2
  turn, reply = "<{role}>{content}</>", "<assistant>"  # The template.

  def apply_chat_template(self, messages, add_generation_prompt, tokenize):
    if tokenize:
      raise NotImplementedError(f"{type(self).__name__} renders text only (tokenize=False)")
    text = "".join(self.turn.format(role=m["role"], content=m["content"]) for m in messages)
    return text + (self.reply if add_generation_prompt else "")

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [self.offset + b for b in text.encode()]}

  def decode(self, ids, skip_special_tokens=True):
    return bytes(int(i) - self.offset for i in ids
                 if self.offset <= i < self.offset + 256).decode("utf-8", "replace")


class ShiftedByteTokenizer(ByteTokenizer):
  """`tiny-qwen2`'s: id = byte + 40 (0 pad, 1 eos); template `[role] content\n...[assistant] `."""
  chat_template = "shifted"
  offset = 40
  turn, reply = "[{role}] {content}\n", "[assistant] "


def _random(config: ModelConfig, tokenizer, name: str, seed: int):
  from single_multi.models.loading import Model

  params = transformer.init_params(config, jax.random.key(seed))
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, params)
  return Model(config, params, tokenizer, name)


def model(seed: int):
  return _random(CONFIG, ByteTokenizer(), f"tiny{seed}", seed)


def qwen2_model(seed: int):
  return _random(QWEN2_CONFIG, ShiftedByteTokenizer(), f"tiny-qwen2-{seed}", seed)
