"""The run spec: what a loop config means, parsed once.

    spec = RunSpec.of(config)     # frozen; ValueError for a bad strategy / distillation field
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
from ml_collections import config_dict

from single_multi import collab, decoding, distill
from single_multi import train as train_lib
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
                               seed=config.seed, max_norm_growth=d.max_norm_growth)


def sampler_of(config) -> Any:
  """The config's sampler, used by every decode of the loop (temperature 0: greedy)."""
  return decoding.make_sampler(config.temperature, config.top_p)


def policy_sampler(config) -> decoding.Sampling:
  """How each student samples its own answers for on_policy_kd (temperature at least 0.7)."""
  return decoding.Sampling(temperature=max(config.temperature, 0.7), top_p=config.top_p)


# What a sampling key is for (with the seed and the round it names every decode of the loop).
PURPOSES = ("test_singles", "test_collab", "dev_singles", "dev_collab", "policy")


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
  seed: int

  @classmethod
  def of(cls, config: config_dict.ConfigDict) -> RunSpec:
    return cls(config.strategy, strategy_config(config), distill_config(config),
               sampler_of(config), policy_sampler(config),
               bool(config.get("fused_round", False)), int(config.seed))
