"""The paper's second pool: three models of different families and tokenizers (by hub id),
Qwen2.5-7B-Instruct, Llama-3.1-8B-Instruct (gated on the hub: accept its licence and log in
first) and DeepSeek-R1-Distill-Qwen-7B, with configs/paper.py's task files, LoRA and sampling.
They collaborate in text (`pool_kind="heterogeneous"`): each is its own architecture group, reads
its own chat template, and distils the collaboration's answers in its own tokens (hetero_loop.py).
Logit-, token- and weight-level strategies need one vocabulary and are refused; so are the routers
and the fused round.

Run (TPU/GPU): python -m single_multi.main --config=configs/hetero.py \\
                   --config.task=moco:gsm8k --workdir=gs://bucket/hetero/gsm8k
Plan only:     XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
               python -m single_multi.main --config=configs/hetero.py --dry_run
"""

from single_multi import configs


def get_config():
  c = configs.load("paper.py", relative_to=__file__)
  c.pool = ("hf:Qwen/Qwen2.5-7B-Instruct", "hf:meta-llama/Llama-3.1-8B-Instruct",
            "hf:deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
  c.pool_kind = "heterogeneous"
  c.strategy = "multiagent_refine"  # A text-level strategy (hetero_loop.STRATEGIES).
  return c
