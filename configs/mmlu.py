"""The paper's setting: three Qwen2.5-7B-Instruct domain experts (by hub id) on MMLU-Redux, LoRA
r=64 / alpha=16 / dropout 0.1 on q/k/v/o, lr 1e-5 cosine with 10% warmup, batch 16 (1 x 16
accumulation), 3 rounds, bf16, an fsdp mesh. Sampling at temperature 0.7, top-p 0.9, 512 tokens.

Run (TPU/GPU): python -m single_multi.main --config=configs/mmlu.py --workdir=gs://bucket/run
Plan only:     XLA_FLAGS=--xla_force_host_platform_device_count=8 \
               python -m single_multi.main --config=configs/mmlu.py --dry_run
"""

from ml_collections import config_dict

from single_multi import configs


def get_config():
  c = configs.load("quickstart.py", relative_to=__file__)
  c.pool = ("hf:Qwen/Qwen2.5-7B-Instruct", "hf:Qwen/Qwen2.5-7B-Instruct",
            "hf:Qwen/Qwen2.5-7B-Instruct")  # Replace with the three domain experts' hub ids.
  c.specialists = ()
  c.task = "mmlu_redux"
  c.dtype = "bfloat16"
  c.k_shot = 0
  c.dev_examples = 100000
  c.fit_examples = 0  # The reference fits strategies on the dev rows and keeps every output.
  c.distill.correctness_filter = False
  c.test_examples = 100000
  c.batch_size = 32
  c.max_new_tokens = 512
  c.temperature = 0.7
  c.top_p = 0.9
  c.rounds = 3
  c.strategy = "logit_fusion"
  c.strategy_config = config_dict.ConfigDict()
  c.distill.lora_rank = 64
  c.distill.lora_alpha = 16.0
  c.distill.lora_dropout = 0.1
  c.distill.learning_rate = 1e-5
  c.distill.batch_size = 1
  c.distill.epochs = 1.0
  c.distill.accumulation = 16
  c.mesh = {"fsdp": -1}
  c.keep_checkpoints = 3
  return c
