"""The run spec: what a loop config means, parsed once.

    validate(config)              # ConfigError (a ValueError) naming the field and what is allowed
    spec = RunSpec.of(config)     # frozen
    spec.scfg, spec.dcfg, spec.sampler, spec.policy_sampler, spec.fused

The loop (`evolve.Loop.spec`), the row builders (`rows.py`), the compile plan and the dry run
read these objects instead of parsing `config.strategy_config` / `config.distill` again.
Sampling keys: `sample_key(seed, round, purpose)` names every decode of the loop; each row then
folds in its example id (`evaluate.example_keys`), so a sample depends on neither the batch size,
the length bucket, the process count nor the round mode (staged or fused).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from single_multi import collab, configs, decoding, distill, hetero_loop, rows as rows_lib
from single_multi import train as train_lib
from single_multi.collab import merge as merge_lib, token_level
from single_multi.configs import ConfigError
from single_multi.data import tasks
from single_multi.models import lora as lora_lib


def _dataclass_from(cls, overrides: dict[str, Any]):
  """A frozen config dataclass with overrides; unknown keys are an error naming the valid ones."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(overrides) - names
  if unknown:
    raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}; valid: {sorted(names)}")
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
  return cls(**values)


def strategy_config(config: config_dict.ConfigDict):
  """The strategy's config dataclass with `config.strategy_config`'s overrides."""
  spec = collab.get(config.strategy)
  overrides = config.strategy_config.to_dict() if "strategy_config" in config else {}
  return _dataclass_from(spec.Config, overrides)


def distill_config(config: config_dict.ConfigDict) -> distill.DistillConfig:
  d = config.distill
  lora = (lora_lib.LoraConfig(rank=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout,
                              targets=tuple(d.lora_targets)) if d.lora_rank else None)
  optim = train_lib.OptimConfig(learning_rate=d.learning_rate, accumulation=d.accumulation,
                                warmup_fraction=d.warmup_fraction, schedule=d.schedule,
                                clip_norm=d.clip_norm, weight_decay=d.weight_decay)
  return distill.DistillConfig(method=d.method, lora=lora, optim=optim, batch_size=d.batch_size,
                               epochs=d.epochs, correctness_filter=d.correctness_filter,
                               seed=config.seed, max_norm_growth=d.max_norm_growth,
                               replay=d.get("replay", 0))


def sampler_of(config) -> Any:
  """The config's sampler, used by every decode of the loop (temperature 0: greedy)."""
  return decoding.make_sampler(config.temperature, config.top_p)


def policy_sampler(config) -> decoding.Sampling:
  """How each student samples its own answers for on_policy_kd (temperature at least 0.7)."""
  return decoding.Sampling(temperature=max(config.temperature, 0.7), top_p=config.top_p)


# What a sampling key is for (with the seed and the round it names every decode of the loop).
PURPOSES = ("test_singles", "test_collab", "dev_singles", "dev_collab", "policy", "fit_singles")


def sample_key(seed: int, round_: int, purpose: str) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), round_),
                            PURPOSES.index(purpose))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """The parsed objects of one loop config (all hashable: they are static arguments of jits)."""

  strategy: str
  scfg: Any  # The strategy's config dataclass.
  dcfg: distill.DistillConfig
  sampler: Any  # Every decode of the loop (temperature 0: greedy).
  policy_sampler: decoding.Sampling  # on_policy_kd's students sampling their own answers.
  fused: bool  # config.fused_round: each round r >= 1 is one program.

  @classmethod
  def of(cls, config: config_dict.ConfigDict) -> RunSpec:
    return cls(config.strategy, strategy_config(config), distill_config(config),
               sampler_of(config), policy_sampler(config),
               bool(config.get("fused_round", False)))


# -------------------------------------------------------------------------------------------------
# Validation: every check that needs no compute.


POOL_KINDS = ("stacked", "heterogeneous")
EVALUATE_ON = ("test", "validation")


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and np.isfinite(v)


# Field -> (allowed?, what is allowed): checked before anything loads.
RANGES: dict[str, tuple[Any, str]] = {
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "k_shot": (lambda v: 0 <= v <= 64, "an integer in [0, 64]"),
    "dev_examples": (lambda v: v >= 1, "an integer >= 1"),
    "fit_examples": (lambda v: v >= 0, "an integer >= 0 (0: fit on the dev rows)"),
    "test_examples": (lambda v: v >= 1, "an integer >= 1"),
    "rounds": (lambda v: v >= 0, "an integer >= 0"),
    "keep_checkpoints": (lambda v: v >= 1, "an integer >= 1 (0 would keep nothing to resume "
                                           "from)"),
    "temperature": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    "top_p": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "specialist_steps": (lambda v: v >= 1, "an integer >= 1"),
    "specialist_examples": (lambda v: v >= 1, "an integer >= 1"),
    "specialist_learning_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "distill.accumulation": (lambda v: v >= 1, "an integer >= 1"),
    "distill.epochs": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.learning_rate": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.lora_rank": (lambda v: v >= 0, "an integer >= 0 (0: full fine-tuning)"),
    "distill.lora_alpha": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "distill.lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "distill.warmup_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "distill.clip_norm": (lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clip)"),
    "distill.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "distill.max_norm_growth": (lambda v: _finite(v) and v > 1, "a finite factor > 1"),
    "compile_prompt_length": (lambda v: v >= 1, "an integer >= 1"),
}


def validate(config: config_dict.ConfigDict) -> None:
  """Every check that needs no compute, so a bad config fails before any model loads; each
  failure is a ConfigError (a ValueError) naming the field, the value and what is allowed."""
  try:
    _validate(config)
  except ConfigError:
    raise
  except ValueError as e:  # The dataclasses' own checks (strategy, distillation, optimizer).
    raise ConfigError(str(e)) from e


def _validate(config: config_dict.ConfigDict) -> None:
  fields = configs.leaves(config)
  for name, (ok, allowed) in RANGES.items():
    value = fields.get(name)
    if value is not None and not ok(value):
      raise ConfigError(f"{name}={value!r} is not allowed: give {allowed}")
  if not config.pool:
    raise ConfigError("pool is empty: give at least one model source")
  for name in [config.task, *config.specialists]:
    tasks.parse_name(name)  # Raises for an unknown task.
  if config.get("evaluate_on", "test") not in EVALUATE_ON:
    raise ConfigError(f"evaluate_on={config.evaluate_on!r} is not allowed: give one of "
                      f"{list(EVALUATE_ON)}")
  kind = config.get("pool_kind", "stacked")
  if kind not in POOL_KINDS:
    raise ConfigError(f"pool_kind={kind!r} is not allowed: give one of {list(POOL_KINDS)}")
  if kind == "heterogeneous" and (why := hetero_loop.refusal(config)):
    raise ConfigError(why)
  spec = collab.get(config.strategy)
  size = len(config.specialists) if config.specialists else len(config.pool)
  if size < spec.min_models:
    raise ConfigError(f"strategy={config.strategy!r} needs at least {spec.min_models} models; "
                      f"the pool will have {size}" + (" (one per specialist)"
                                                      if config.specialists else "")
                      + ": give more models, or use strategy='single'")
  run_spec = RunSpec.of(config)  # The strategy's and the distillation's own field checks.
  scfg, method = run_spec.scfg, rows_lib.method(config.distill.method)
  level = spec.level
  if (level == "weight" and scfg.method in merge_lib.NEEDS_BASE and not config.get("merge_base")
      and not config.specialists):
    raise ConfigError(f"strategy={config.strategy!r} merges task vectors (member - base) and the "
                      "base is unknown: set --config.merge_base=<model source> (the model the "
                      "members were fine-tuned from), build the pool with `specialists` (their "
                      "base is pool[0]), or use strategy='linear'")
  if config.get("fit_examples", 0) and (run_spec.fused or kind == "heterogeneous"):
    raise ConfigError("fit_examples: strategies fitted on held-out dev rows run in the staged "
                      "round of a stacked pool; set fit_examples=0, or fused_round=False and "
                      "pool_kind='stacked'")
  if run_spec.fused and config.distill.correctness_filter:
    raise ConfigError("fused_round: the correctness filter scores the collaboration's dev answers "
                     "as text between collaborating and distilling, which one program cannot; "
                     "set fused_round=False or distill.correctness_filter=False")
  if run_spec.fused and method.traced is None:
    fused = sorted(n for n, m in rows_lib.METHODS.items() if m.traced is not None)
    raise ConfigError(f"fused_round: distill.method={config.distill.method!r} has no row builder "
                      f"inside the round program (rows.METHODS); set fused_round=False, or use "
                      f"one of {fused}")
  if run_spec.fused and spec.select is not None:
    raise ConfigError(f"fused_round: {config.strategy} votes on answers extracted from text on "
                      "the host (the reference's rule), which one program cannot; set "
                      "fused_round=False")
  if run_spec.dcfg.replay and (not config.specialists or kind != "stacked" or run_spec.fused
                               or config.distill.method != "supervised_kd"):
    raise ConfigError(f"distill.replay={run_spec.dcfg.replay}: replaying each member's specialist "
                      "rows needs a stacked pool built from `specialists`, staged rounds and "
                      "distill.method='supervised_kd'; set distill.replay=0")
  if method.needs_combine and spec.combine is None:
    raise ConfigError(f"on_policy_kd scores the students' samples with the collaboration token "
                      f"by token; {config.strategy} cannot score given tokens: use one of "
                      f"{token_level.scoring_strategies()}, or distill.method='logit_kd' / "
                      "'supervised_kd'")
  if method.teacher and level not in ("logit", "token"):
    rowed = sorted(n for n, x in collab.REGISTRY.items() if x.level in ("logit", "token"))
    raise ConfigError(f"{config.distill.method} needs per-token teacher rows, which only logit- "
                      f"and token-level strategies produce; {config.strategy} is {level}-level: "
                      f"use one of {rowed}, or distill.method='supervised_kd'")
