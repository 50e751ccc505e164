"""Embedded Co-LLM run (CPU, ~10-15 min): SmolLM2-135M-Instruct as the base, a SmolLM2 specialist
fine-tuned on BIG-bench 2-digit multiplication as the assistant; train the gate (and the base),
calibrate eta on validation rows, evaluate base / assistant / random deferral / weak supervision /
Co-LLM on test rows.

Run: python -m single_multi.main --config=configs/co_llm_bigbench.py --workdir=/tmp/co_llm
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.job = "co_llm"
  c.base = "embedded:smollm2-135m-instruct"
  c.assistant = ""  # A model source; "": fine-tune the base into a specialist (cached).
  c.assistant_steps = 60
  c.assistant_learning_rate = 1e-4
  c.task = "bigbench:arithmetic/2_digit_multiplication"
  c.instruction = "Answer with the number only."
  c.dtype = "float32"
  c.seed = 0
  c.train_examples = 256  # Dev rows used for training (the rest of dev: validation).
  c.val_fraction = 0.3
  c.val_examples = 48
  c.test_examples = 96
  c.batch_size = 16
  c.max_new_tokens = 8
  c.train = config_dict.ConfigDict()
  c.train.base = "full"  # "full", "lora" or "gate".
  c.train.lora_rank = 16
  c.train.lora_alpha = 32.0
  c.train.steps = 60
  c.train.batch_size = 8
  c.train.learning_rate = 2e-5
  c.train.gate_learning_rate = 1e-3
  c.train.warmup_fraction = 0.1
  c.train.init = "a"  # Gate init: "a" (assistant right, base wrong), "b" (base wrong), "none".
  return c
