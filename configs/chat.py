"""Chat demo: the real SmolLM2-135M-Instruct (from PyPI) answering chat prompts on CPU.

Run: python -m single_multi.main --config=configs/chat.py
Override any field: --config.max_new_tokens=64 --config.temperature=0.7
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.job = "chat"
  c.model = "embedded:smollm2-135m-instruct"  # Any model source: dir, .gguf, hf:org/name.
  c.dtype = "float32"  # or "bfloat16".
  c.jax_cache_dir = "auto"  # The compilation cache ("": off; see docs/config.md).
  c.seed = 0
  c.batch_size = 4
  c.max_new_tokens = 96
  c.temperature = 0.0  # 0: greedy; > 0: sampling with top_p below.
  c.top_p = 0.9
  c.prompts = (
      "What is the capital of France?",
      "Name three prime numbers greater than 10.",
      "In one sentence, why is the sky blue?",
      "If I have 3 apples and eat one, how many are left?",
      "Write a haiku about autumn.",
  )
  return c
