"""The single-multi paper's main setting on its own tasks: the pool, LoRA and sampling of
configs/mmlu.py (three Qwen2.5-7B-Instruct experts by hub id, LoRA r=64 / alpha 16 / dropout 0.1 on
q/k/v/o, lr 1e-5 cosine with 10% warmup, batch 16 as 1 x 16 accumulation, 3 rounds, bf16,
temperature 0.7, top-p 0.9, 512 new tokens) on the paper's task files with their published splits,
prompts and scoring (`moco:<task>`, data/moco.py). The paper runs each task on its own:

  for t in agieval arc_challenge mmlu_redux bbh gsm8k math gpqa_diamond tablemwp theoremqa \\
           wikidyk popqa blend truthfulqa sciriff human_interest; do
    python -m single_multi.main --config=configs/paper.py --config.task=moco:$t \\
        --config.moco_data_dir=/path/to/model_collaboration/data --workdir=gs://bucket/paper/$t
  done

human_interest is scored by `reward_model` (default: the reference's Skywork reward model).
Plan only: XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
           python -m single_multi.main --config=configs/paper.py --dry_run
"""

from single_multi import configs


def get_config():
  c = configs.load("mmlu.py", relative_to=__file__)
  c.task = "moco:mmlu_redux"
  return c
