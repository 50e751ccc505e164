"""single_multi: model collaboration and the single-multi evolution loop in JAX/Flax.

The model core, as a Python API:

  import single_multi as sm
  model = sm.load("embedded:smollm2-135m-instruct")        # or a dir, a .gguf, "hf:org/name"
  logits, _ = sm.forward(model.params, tokens, model.config, mask_bt=mask)
  sm.generate(model, [[{"role": "user", "content": "Hi!"}]], max_new_tokens=32)
"""

from single_multi.decoding import Greedy, Sampling, decode, encode_chat, generate, left_pad
from single_multi.models.config import ModelConfig
from single_multi.models.loading import LoadError, Model, load, save_hf
from single_multi.models.lora import LoraConfig, LoraState
from single_multi.models.transformer import forward, hidden_states, init_cache, init_params

__all__ = [
    "Greedy", "Sampling", "decode", "encode_chat", "generate", "left_pad", "ModelConfig",
    "LoadError", "Model", "load", "save_hf", "LoraConfig", "LoraState", "forward",
    "hidden_states", "init_cache", "init_params",
]
