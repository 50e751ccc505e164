"""The embedded default: the single-multi loop on CPU in about 13 minutes (2 cores), nothing to download
but two PyPI files (SmolLM2-135M-Instruct's GGUF and the BIG-bench sdist).

A diverse pool is built from SmolLM2-135M-Instruct: three specialists from short LoRA fine-tunes
on disjoint BIG-bench task families (cached in the workdir). They collaborate by logit fusion on
dev rows of real BIG-bench tasks, each distils the collaboration's answers, and round by round
singles and the collaboration are scored on test rows.

Run: python -m single_multi.main --config=configs/quickstart.py --workdir=/tmp/single_multi
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.job = "evolve"
  c.seed = 0
  c.dtype = "float32"
  # The pool: model sources (dir, .gguf, hf:org/name, embedded:...). With `specialists`, the
  # first source is the base each specialist is fine-tuned from (one per task family).
  c.pool = ("embedded:smollm2-135m-instruct",)
  # "stacked": one architecture and tokenizer; "heterogeneous": groups exchanging text.
  c.pool_kind = "stacked"
  c.specialists = ("bigbench:arithmetic/2_digit_addition", "bigbench:date_understanding",
                   "bigbench:sports_understanding")
  c.specialist_steps = 6
  c.specialist_examples = 48
  c.specialist_learning_rate = 3e-4
  c.task = "bigbench:arithmetic/1_digit_addition,navigate,general_knowledge"
  c.data_manual_dir = ""  # The TFDS builders' manual dir (MMLU parquet, GSM8K JSONL, BIG-bench).
  c.moco_data_dir = ""  # The MoCo task files for moco:<task> ("": $SINGLE_MULTI_MOCO_DATA or the cache).
  c.reward_model = ""  # Scores reward-model tasks (moco:human_interest); "": the reference's.
  c.k_shot = 0
  c.dev_examples = 32
  c.test_examples = 32
  c.batch_size = 16
  c.max_new_tokens = 8
  c.temperature = 0.0  # 0: greedy (the reference samples at 0.7, top-p 0.9).
  c.top_p = 0.9
  c.rounds = 2
  c.strategy = "logit_fusion"
  c.strategy_config = config_dict.ConfigDict()  # Overrides of the strategy's config dataclass.
  # Task-vector merges (dare_ties, ties, task_arithmetic): the model the members were fine-tuned
  # from. "": the specialists' base (pool[0]) when the pool is built from specialists.
  c.merge_base = ""
  c.distill = config_dict.ConfigDict()
  c.distill.method = "supervised_kd"
  c.distill.lora_rank = 8  # 0: full fine-tuning.
  c.distill.lora_alpha = 16.0
  c.distill.lora_dropout = 0.0
  c.distill.lora_targets = ("q", "k", "v", "o")
  c.distill.learning_rate = 3e-4
  c.distill.schedule = "cosine"
  c.distill.warmup_fraction = 0.1
  c.distill.clip_norm = 1.0
  c.distill.weight_decay = 0.0
  c.distill.batch_size = 4
  c.distill.accumulation = 1
  c.distill.epochs = 1.0
  c.distill.correctness_filter = False
  c.distill.max_norm_growth = 10.0  # Divergence guard: a weight norm x this since a stage's start.
  c.mesh = config_dict.ConfigDict({"data": -1})
  c.keep_checkpoints = 2
  # Fields allowed to differ from the workdir's recorded config when a run resumes, e.g.
  # ("rounds",) to extend a finished run; any other change is refused (evolve.py).
  c.resume_allow = ()
  # True: each round is one jax.jit program (every distillation method but the correctness
  # filter; a checkpoint per round).
  c.fused_round = False
  # --dry_run with a TPU topology ("v5p:2x2x2"): compile every program for it (compile_plan.py).
  c.compile_topology = ""
  c.compile_prompt_length = 1024  # The prompt bucket the plan compiles for.
  return c
