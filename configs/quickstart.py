"""The embedded default: the single-multi loop on CPU (2 cores), nothing to download but one PyPI
file (SmolLM2-135M-Instruct's GGUF).

A pool of three specialists is built from SmolLM2-135M-Instruct, each a short LoRA fine-tune on
rows of one generated task family (data/synthetic.py: numbers to words, "4342" -> "four thousand
three hundred forty two"; word order reversed, "river stone lamp" -> "lamp stone river"; numbers
sorted, "42 7 19 88" -> "7 19 42 88"; bare inputs, exact match, chance level 0) that never appear
among the loop's dev or test rows (`pools.specialist_rows`). The loop's task is the held-out rows
of the same three families: 90 dev rows (30 per family) the pool collaborates on and distils from,
90 other dev rows the router is fitted on (`fit_examples`), 300 test rows (100 per family). The
collaboration is a trained router (a linear head on the first member's hidden states, fitted on
the fit rows' per-model scores); each member distils the router's dev answers that are correct
(`correctness_filter`). Until 2026-12-06 the families were three BIG-bench ones
(configs/quickstart_bigbench.py); the package index then stopped offering the BIG-bench sdist.

Chosen on dev rows only (`scripts/screen_families.py`: the base and a specialist per candidate
family, scored on the loop's dev selection). The base scores 0.00 on every candidate (it
explains or echoes instead of answering); each specialist scores 0.00 on every family but its
own. Own-family scores, first screen (5 families, 18 rows each) / second screen (4 families,
22-23 rows each): number_words 0.78 / 0.74, reverse_words 0.72 / 0.68, sort_numbers 0.67 / 0.64,
key_value 0.83 / 0.26, acronym 0.44 / not rescreened. Rule: the three with the highest pooled
score. (number_words drew from 0-999 in both screens, which leaves 395 dev rows, too few for
the loop's dev, fit, specialist and validation selections; it draws from 0-9999 since. The
second screen meant to score the new version but read the old rows from a cached file, a bug
since fixed (data/synthetic.py rewrites a file that differs from its generator); the new
version's specialist scores 0.79 on the validation rows below.) Every other setting is the BIG-bench default's, kept
without retuning (chosen there on validation rows: the specialists' recipe, 30 steps at lr 2e-3
on 120 rows; the distillation, LoRA rank 8, lr 2e-3, batch 8, 3 epochs; and two deviations from
the reference, which fits the strategy on the same dev rows the members then distil and keeps
every collaborative output: here the router is fitted on 90 held-out dev rows and the members
distil only its correct answers).

On 300 validation rows (`--config.evaluate_on=validation`: dev rows outside every other
selection; never test rows): round-0 router 0.597 against the best single's 0.263; round 1 single
mean +0.121 [+0.083, +0.158], router -0.207 [-0.273, -0.147]. The members forget part of their own
family, most of all sort_numbers (0.55 -> 0.15): after distilling number_words rows (digits in,
words out) the sort member spells numbers on 61 of 100 sort rows, both families' inputs being
digits. Variants on the same rows, not adopted: 6 distillation epochs, router -0.153 [-0.210,
-0.100] and single mean +0.206, 13:34 wall with the specialists reused (about 3 minutes more
with them trained, past the 15-minute target); dare_ties as the
collaboration, its uniform merge of the specialists scores 0.053 at round 0 (stopped there);
key_value for sort_numbers, its specialist scores 0.39 and its one-digit answers have a chance
level near 0.1, not 0 (stopped after round 0). See docs/results.md for the measured test run.

Run: python -m single_multi.main --config=configs/quickstart.py --workdir=/tmp/single_multi
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.job = "evolve"
  c.seed = 0
  c.dtype = "float32"
  c.jax_cache_dir = "auto"  # The compilation cache ("": off; see docs/config.md).
  c.eval_cache = ""  # Kept evaluations, read instead of decoded ("": off; see docs/config.md).
  # The pool: model sources (dir, .gguf, hf:org/name, embedded:...). With `specialists`, the
  # first source is the base each specialist is fine-tuned from (one per task family).
  c.pool = ("embedded:smollm2-135m-instruct",)
  # "stacked": one architecture and tokenizer; "heterogeneous": groups exchanging text.
  c.pool_kind = "stacked"
  c.specialists = ("synthetic:number_words", "synthetic:reverse_words", "synthetic:sort_numbers")
  c.specialist_steps = 30
  c.specialist_examples = 120
  c.specialist_learning_rate = 2e-3
  c.task = "synthetic:number_words,reverse_words,sort_numbers"
  c.data_manual_dir = ""  # The TFDS builders' manual dir (MMLU parquet, GSM8K JSONL, BIG-bench).
  c.moco_data_dir = ""  # The MoCo task files for moco:<task> ("": $SINGLE_MULTI_MOCO_DATA or the cache).
  c.reward_model = ""  # Scores reward-model tasks (moco:human_interest); "": the reference's.
  c.k_shot = 0
  c.dev_examples = 90
  # Held-out dev rows the strategy is fitted on each round (0: the dev rows, as the reference).
  c.fit_examples = 90
  c.test_examples = 300
  # "validation": score test_examples held-out dev rows instead of test rows (choosing a setting).
  c.evaluate_on = "test"
  c.batch_size = 16
  c.max_new_tokens = 12
  c.temperature = 0.0  # 0: greedy (the reference samples at 0.7, top-p 0.9).
  c.top_p = 0.9
  c.rounds = 1
  c.strategy = "trained_router"
  # Overrides of the strategy's config dataclass. kind "head": the fast router (the reference's
  # LM router fine-tunes a separate model for 5 epochs).
  # labels "best": one model per dev query, as the reference; "tied": see collab/routers.py.
  c.strategy_config = config_dict.ConfigDict({"kind": "head", "labels": "best"})
  # Task-vector merges (dare_ties, ties, task_arithmetic): the model the members were fine-tuned
  # from. "": the specialists' base (pool[0]) when the pool is built from specialists.
  c.merge_base = ""
  c.distill = config_dict.ConfigDict()
  c.distill.method = "supervised_kd"
  c.distill.lora_rank = 8  # 0: full fine-tuning.
  c.distill.lora_alpha = 16.0
  c.distill.lora_dropout = 0.0
  c.distill.lora_targets = ("q", "k", "v", "o")
  c.distill.learning_rate = 2e-3
  c.distill.schedule = "cosine"
  c.distill.warmup_fraction = 0.1
  c.distill.clip_norm = 1.0
  c.distill.weight_decay = 0.0
  c.distill.batch_size = 8
  c.distill.accumulation = 1
  c.distill.epochs = 3.0
  c.distill.correctness_filter = True  # Off in the reference (see above).
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
