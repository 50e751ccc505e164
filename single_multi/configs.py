"""Helpers for config files (loaded by path, as `config_flags` does)."""

from __future__ import annotations

import importlib.util
import pathlib


class ConfigError(ValueError):
  """A config field's value is not allowed: names the field, the value and what is allowed."""


def load(path: str | pathlib.Path, relative_to: str | pathlib.Path | None = None):
  """`get_config()` of the config file `path` (relative to the directory of `relative_to`, a
  config file's `__file__`, when given): how one config builds on another."""
  path = pathlib.Path(path)
  if relative_to is not None:
    path = pathlib.Path(relative_to).resolve().parent / path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# -------------------------------------------------------------------------------------------------
# The config reference (docs/config.md), generated from the configs in configs/ and FIELDS below.
# tests/test_configs.py fails when a field of any config has no entry here, when an entry names
# no field, or when docs/config.md differs from what `python -m single_multi.configs` writes.

FIELDS: dict[str, str] = {
    # Every job.
    "job": "`evolve` (the single-multi loop), `co_llm` (Co-LLM training and evaluation) or "
           "`chat` (answer `prompts`).",
    "seed": "Seeds everything: data splits, initialisations, sampling, distillation order.",
    "dtype": "Parameter and compute dtype (`float32`, `bfloat16`).",
    "jax_cache_dir": "JAX's persistent compilation cache: `auto` is `$JAX_COMPILATION_CACHE_DIR` "
                     "when set, else `<SINGLE_MULTI_CACHE>/jax`; empty: off; else that directory "
                     "(local or gs://). A later run reads the programs an earlier one compiled "
                     "(`assets.enable_compilation_cache`).",
    "eval_cache": "Directory of kept evaluations (`eval_memo.py`): an evaluation of the loop "
                  "whose params, rows, prompts, decoding, strategy state and code all match a "
                  "kept one is read, not decoded (a sweep's runs share round 0; round 1 reuses "
                  "round 0's answers on the fit rows); staged rounds only (a fused round "
                  "decodes inside its program); `workdir`: `<workdir>/eval_cache` (a resumed run "
                  "re-scores nothing; a Loop made without a workdir keeps nothing); empty: off.",
    "batch_size": "Examples per decoding / scoring batch.",
    "max_new_tokens": "Tokens generated per answer at most.",
    "temperature": "Sampling temperature; 0 is greedy decoding.",
    "top_p": "Nucleus sampling mass (with temperature > 0).",
    "task": "Task spec: `bbh`, `mmlu`, `mmlu_redux`, `gsm8k`, `bigbench_knowledge`, "
            "`bigbench:<task>[/<subtask>],...`, `moco:<task>,...` (the paper's 15 tasks) or "
            "`synthetic:<family>,...` (generated, nothing to download); data/tasks.py, "
            "data/moco.py, data/synthetic.py.",
    "test_examples": "Held-out test rows scored: split evenly over the task's families, each "
                     "family's rows in a seeded order (`common.balanced`).",
    "evaluate_on": "`test`: every round scores test_examples test rows. `validation`: it scores "
                   "test_examples rows of the dev split instead, none among the loop's dev rows "
                   "or a specialist's training rows (`evolve.held_out_dev_rows`, checked), for "
                   "choosing a setting without seeing a test score; summary.json records which.",
    "data_manual_dir": "The TFDS builders' manual dir (`mmlu`/`mmlu_redux` parquet files, "
                       "GSM8K's JSONL files, a BIG-bench checkout) for offline preparation; "
                       "empty: download when online (BIG-bench: `$SINGLE_MULTI_BIGBENCH`'s "
                       "checkout when set, else the bigbench 1.0.0 sdist).",
    "moco_data_dir": "Directory of the MoCo toolkit's task files (`<task>.json`) that `moco:` "
                     "tasks read; empty: `$SINGLE_MULTI_MOCO_DATA`, else the cache (downloaded "
                     "once at the pinned commit, sha256-checked).",
    "reward_model": "Model source of the reward model that scores reward-model tasks "
                    "(`moco:human_interest`), loaded only when the task has such rows; empty: "
                    "the reference's `hf:Skywork/Skywork-Reward-Llama-3.1-8B-v0.2`.",
    # evolve.
    "pool": "Model sources (HF dir, `.gguf`, `hf:org/name`, `embedded:<name>`, `tiny:<seed>`, "
            "`tiny-qwen2:<seed>`). With `specialists`, the first is the base they are fine-tuned "
            "from.",
    "pool_kind": "`stacked`: one architecture and tokenizer, the members stacked on a leading "
                 "axis (every strategy). `heterogeneous`: members grouped by architecture and "
                 "tokenizer, each group stacked; the groups exchange text (text-level strategies "
                 "but the routers; supervised_kd / multi_student_kd; hetero_loop.py).",
    "specialists": "Task specs, one per specialist: the base fine-tuned (LoRA r=8, merged) on "
                   "that task's dev rows outside the loop's dev and test rows "
                   "(`pools.specialist_rows`) becomes a pool member; cached under the workdir; "
                   "summary.json records each one's and the base's score on its family.",
    "specialist_steps": "Optimizer steps per specialist fine-tune.",
    "specialist_examples": "Dev rows per specialist fine-tune.",
    "specialist_learning_rate": "AdamW learning rate of the specialist fine-tunes.",
    "k_shot": "Exemplars per prompt, from the task's shot split (0: zero-shot).",
    "dev_examples": "Dev rows the pool collaborates on each round (the distillation data) and "
                    "fits strategies on (unless `fit_examples`).",
    "fit_examples": "0: strategies are fitted on the dev rows (router labels, best-on-dev "
                    "choices, merge weights), as in the reference. N > 0: on N other dev rows "
                    "instead, none among the dev rows or a specialist's training rows "
                    "nor the validation rows `evaluate_on=\"validation\"` would score "
                    "(`evolve.held_out_dev_rows`: the same fit rows in either mode), so that "
                    "after a round the fit sees the members' answers on rows they were not "
                    "distilled on (staged rounds, stacked pools).",
    "rounds": "Rounds of collaborate -> distil -> evaluate after round 0.",
    "strategy": "Collaboration strategy (a `collab` registry name, README table).",
    "strategy_config": "Overrides of the strategy's config dataclass fields, set in a config "
                       "file (`c.strategy_config.rounds = 2`; the command line can override "
                       "the keys a file sets); unknown keys fail before anything runs.",
    "merge_base": "Model source of the base that task-vector merges (`dare_ties`, `ties`, "
                  "`task_arithmetic`) are taken against, loaded once and fixed across rounds; "
                  "empty: the specialists' base (pool[0]) when `specialists` is set, otherwise "
                  "those strategies are refused before anything loads.",
    "distill.method": "`supervised_kd`, `multi_student_kd`, `logit_kd` or `on_policy_kd` "
                      "(distill.py).",
    "distill.lora_rank": "LoRA rank of the distillation updates; 0 trains all params.",
    "distill.lora_alpha": "LoRA alpha (scale alpha / rank).",
    "distill.lora_dropout": "Dropout on the LoRA input.",
    "distill.lora_targets": "Projections with LoRA adapters (q, k, v, o, gate, up, down).",
    "distill.learning_rate": "Peak AdamW learning rate.",
    "distill.schedule": "`cosine` or `linear` decay after warmup.",
    "distill.warmup_fraction": "Fraction of the steps spent warming up linearly.",
    "distill.clip_norm": "Global gradient norm clip.",
    "distill.weight_decay": "AdamW weight decay.",
    "distill.batch_size": "Rows per micro-batch.",
    "distill.accumulation": "Micro-batches per optimizer step (a `lax.scan`).",
    "distill.epochs": "Passes over the round's training rows.",
    "distill.correctness_filter": "Keep only dev outputs scored correct (off in the reference). "
                                  "A round in which none is correct distils nothing: the members "
                                  "keep their params, with a warning and `distill.skipped` in "
                                  "the round's record.",
    "distill.replay": "Each member also trains on the first this many rows its specialist was "
                      "fine-tuned on (gold answers; `pools.replay_rows`), to keep its own "
                      "family; not in the reference. Needs `specialists`, a stacked pool, staged "
                      "rounds and supervised_kd. 0: off.",
    "distill.max_norm_growth": "Divergence guard: a member whose weight norm exceeds this factor "
                               "of its norm at a stage's start stops the run, checked "
                               "every step (the fused round: at its end), the last good "
                               "checkpoint kept.",
    "mesh": "Mesh axis sizes ({axis: size} over model/data/fsdp/tensor, one may be -1) the loop "
            "runs on with more than one device, params and optimizer states placed by "
            "sharding.RULES (one process: the whole loop; several: distillation); `--dry_run` "
            "prints its plan. Empty: one device.",
    "keep_checkpoints": "Orbax checkpoints kept (one per finished stage).",
    "resume_allow": "Fields that may differ from the config recorded in `<workdir>/config.json` "
                    "when a run resumes (e.g. `(\"rounds\",)` to extend a finished run); any "
                    "other difference is refused with the changed fields. `fused_round` never "
                    "changes under a run.",
    "fused_round": "Each round as one `jax.jit` program (collaborate on all dev rows, token-space "
                   "rows, every distillation step in a `lax.scan`, test decodes), one checkpoint "
                   "per round; every distillation method, not the correctness filter (fused.py).",
    "compile_topology": "With `--dry_run`: a TPU topology (`v5e:2x2`, `v5p:2x2x2`, ...; "
                        "compile_plan.TOPOLOGIES) to compile every program of a round for, "
                        "ahead of time on this host (needs `pip install -e \".[tpu]\"`); prints "
                        "per-device bytes, FLOPs and a fit verdict, writes "
                        "`<workdir>/compile_plan.json`. Empty: the CPU sharding plan.",
    "compile_prompt_length": "The prompt length (bucketed) the compile plan assumes: the "
                             "longest prompt the run will batch.",
    # chat.
    "model": "The model source that answers.",
    "prompts": "User messages, each answered with the chat template.",
    # co_llm.
    "base": "The base model source (it learns when to defer).",
    "assistant": "The assistant's source; empty: the base fine-tuned into a task specialist "
                 "(cached in the workdir).",
    "assistant_steps": "Optimizer steps of each specialist fine-tune (the assistant's and the "
                       "base's).",
    "assistant_learning_rate": "Their learning rate.",
    "specialist_lora_rank": "LoRA rank of those fine-tunes (alpha 2 x rank, merged); 0: full "
                            "fine-tuning.",
    "base_subjects": "Task families whose rows fine-tune the base into a specialist before "
                     "Co-LLM (cached; rows disjoint from the assistant's, the gate's, validation "
                     "and test); empty: the base as loaded.",
    "base_examples": "Dev rows of that base fine-tune.",
    "evaluate_test": "False: stop after the validation rows (results.json without test "
                     "scores), for choosing a setting without seeing the test rows.",
    "instruction": "Appended to every question.",
    "target": "Training text of the assistant and gate rows: `answer` (the gold answer) or "
              "`solution` (the task's worked solution, e.g. GSM8K's, as the reference trains).",
    "assistant_examples": "Dev rows the specialist assistant is fine-tuned on (when no "
                          "assistant is given); never used for the gate.",
    "assistant_subjects": "Task families the specialist assistant's rows come from (empty: "
                          "all); a mixture task with one family here makes a one-skill "
                          "specialist.",
    "train_examples": "Dev rows for gate (and base) training, balanced over the families "
                      "(each family's last val_fraction is validation).",
    "val_fraction": "Share of dev kept for validation (calibrating eta).",
    "val_examples": "Validation rows used for calibration.",
    "train.base": "`full`, `lora` or `gate` (base frozen): what trains with the gate.",
    "train.lora_rank": "LoRA rank when train.base is `lora`.",
    "train.lora_alpha": "LoRA alpha when train.base is `lora`.",
    "train.steps": "Optimizer steps of the Co-LLM objective (and of the weak-supervision "
                   "baseline); 0: `train.epochs` passes over the training rows.",
    "train.epochs": "Passes over the training rows when train.steps is 0 (reference: 2).",
    "train.batch_size": "Rows per step (reference: 128).",
    "train.learning_rate": "Base learning rate (AdamW; reference: 2e-5).",
    "train.schedule": "`linear` (the reference), `cosine` or `constant`, after the warmup.",
    "train.gate_learning_rate": "The gate row's learning rate; 0: train.learning_rate (the "
                                "reference).",
    "train.warmup_fraction": "Warmup share of the steps (reference: 0.04).",
    "train.init": "Gate init: `a` (assistant right and base wrong), `b` (base wrong) or `none`.",
    "train.init_epochs": "Gate-init passes over the training rows (reference: 1).",
    "train.init_batch_size": "Gate-init rows per step (reference: 8).",
    "train.init_learning_rate": "Gate-init AdamW learning rate (reference: 2e-5).",
}

SECTIONS = (("evolve", ("quickstart.py", "quickstart_bigbench.py", "tiny.py", "mmlu.py",
                        "paper.py", "bbh.py", "tiny_hetero.py", "hetero.py")),
            ("co_llm", ("co_llm_bigbench.py", "co_llm_gsm8k.py")),
            ("chat", ("chat.py",)))


def leaves(config, prefix: str = "") -> dict[str, object]:
  """{dotted field: value}; a nested ConfigDict is walked, except `mesh` and `strategy_config`
  whose keys are free-form (one row each)."""
  out = {}
  for k in sorted(config.keys()):
    v, name = config[k], prefix + k
    if hasattr(v, "keys") and name not in ("mesh", "strategy_config"):
      out.update(leaves(v, name + "."))
    else:
      out[name] = v.to_dict() if hasattr(v, "to_dict") else v
  return out


def undocumented(config) -> list[str]:
  """The config's fields that FIELDS does not describe."""
  return [n for n in leaves(config) if n not in FIELDS]


def reference(config_dir: str | pathlib.Path) -> str:
  """docs/config.md: per job, every field with each config's value and its meaning."""
  config_dir = pathlib.Path(config_dir)
  lines = ["# Config reference", "",
           "Generated by `python -m single_multi.configs > docs/config.md` from the files in "
           "`configs/` and the field descriptions in `single_multi/configs.py` (a test fails "
           "when they drift). Override any field with `--config.<field>=<value>`.", ""]
  for job, files in SECTIONS:
    values = {f: leaves(load(config_dir / f)) for f in files}
    names = sorted(set().union(*values.values()), key=lambda n: (n.count("."), n))
    lines += [f"## `job = \"{job}\"`", "",
              "| field | meaning | " + " | ".join(f"`{f}`" for f in files) + " |",
              "|---" * (2 + len(files)) + "|"]
    for n in names:
      cells = [_cell(values[f].get(n, "—")) for f in files]
      lines.append(f"| `{n}` | {FIELDS.get(n, '**undocumented**')} | " + " | ".join(cells)
                   + " |")
    lines.append("")
  return "\n".join(lines)


def _cell(v) -> str:
  if isinstance(v, str) and v == "—":
    return v
  text = repr(tuple(v) if isinstance(v, list) else v)
  return "`" + text.replace("|", "\\|") + "`"


if __name__ == "__main__":
  print(reference(pathlib.Path(__file__).resolve().parent.parent / "configs"), end="")
