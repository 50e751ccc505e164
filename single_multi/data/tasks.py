"""Named tasks: which builder and config, which split is dev / test / the k-shot pool, which metric.

  load_task("bbh")                          BIG-Bench Hard tasks present in BIG-bench 1.0.0
  load_task("bigbench_knowledge")           knowledge / factuality BIG-bench tasks
  load_task("bigbench:navigate,snarks")     any BIG-bench JSON tasks or subtasks
  load_task("mmlu") / load_task("mmlu_redux", manual_dir=...)
  load_task("gsm8k")                        the official JSONL files (online, or a manual dir)
  load_task("moco:bbh,gsm8k", moco_dir=...) the paper's task files (data/moco.py), published splits,
                                            the reference's prompts and scoring
  load_task("synthetic:number_words,...")   generated exact-match families (data/synthetic.py),
                                            nothing to download

Preparing writes array_record files under `data_dir` (default: <cache>/tensorflow_datasets) once;
later loads read them without rebuilding.

Option order. Builders store options in the source's order. Where that order was authored (BIG-bench
lists the correct option last in its arithmetic tasks and first in date_understanding), a model
can score by position alone, so the loader shows the options of every multiple-choice row in a
random order fixed by (seed, example id) (`common.shuffle_options`), the same in every round,
process and split read. Sources whose order is already random keep it (MMLU's published options;
the gold letters are near uniform), unless the check at load finds a gold position holding more
than twice its uniform share in the task or one of its subjects: then the loader shuffles that
task too and logs why. `Task.positions` is the check on the rows as shown.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import tensorflow_datasets as tfds
from absl import logging

from single_multi import assets
from single_multi.data import bigbench, common, gsm8k, mmlu, moco, synthetic


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  builder: str  # "mmlu" | "bigbench" | "gsm8k"
  config: str | None
  dev_split: str  # Where the collaboration runs and distillation data come from.
  test_split: str  # Where models are judged.
  shot_split: str  # The only split k-shot exemplars are drawn from.
  metric: str  # Generative rows: "exact_match" | "numeric"; "moco": the MoCo rules per row.
  prompt: str = "default"  # pipeline.PromptConfig.style.


TASKS = {
    "mmlu": TaskSpec("mmlu", "all", "validation", "test", "dev", "exact_match"),
    "mmlu_redux": TaskSpec("mmlu", "redux", "validation", "test", "dev", "exact_match"),
    "bbh": TaskSpec("bigbench", "bbh", "dev", "test", "dev", "exact_match"),
    "bigbench_knowledge": TaskSpec("bigbench", "knowledge", "dev", "test", "dev", "exact_match"),
    "gsm8k": TaskSpec("gsm8k", None, "train", "test", "train", "numeric"),
}


# Builders whose sources list the options in an authored order, which is never assumed random.
AUTHORED_OPTION_ORDER = frozenset({"bigbench"})


@dataclasses.dataclass
class Task:
  """A prepared task. seed fixes the option order where the loader shuffles (see module doc)."""
  name: str
  spec: TaskSpec
  builder: tfds.core.DatasetBuilder
  seed: int = 0
  shuffle: bool | None = None  # None: decided at load (`decide_shuffle`).
  _raw: dict = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    if self.shuffle is None:
      self.decide_shuffle()

  def source(self, split: str):
    """Random-access data source of the stored records (options in the source's order; read
    rows through `examples`, which shows them as models see them)."""
    if split not in self.builder.info.splits:
      raise common.DataError(f"task {self.name!r} has no split {split!r}; it has "
                             f"{sorted(self.builder.info.splits)}")
    return self.builder.as_data_source(split=split)

  def _source_examples(self, split: str) -> list[common.Example]:
    if split not in self._raw:
      src = self.source(split)
      rows = [common.Example.from_record(src[i]) for i in range(len(src))]
      if self.spec.builder == "gsm8k":  # Stored in hash order: back to the files' line order.
        rows.sort(key=lambda e: int(e.id.rsplit("/", 1)[1]))
      self._raw[split] = rows
    return self._raw[split]

  def examples(self, split: str) -> list[common.Example]:
    """Every row of a split as `Example`s, bad rows included (their `problem` says why), options
    in the order shown to models."""
    rows = self._source_examples(split)
    return [common.shuffle_options(e, self.seed) for e in rows] if self.shuffle else list(rows)

  def splits(self) -> list[str]:
    return sorted(self.builder.info.splits)

  def decide_shuffle(self) -> None:
    """Shuffles the options of a source in authored order, or of any task whose gold positions
    (over all its splits) are skewed; logs the reason."""
    if self.spec.builder in AUTHORED_OPTION_ORDER:
      self.shuffle = True
      return
    check = common.position_check(e for s in self.splits() for e in self._source_examples(s))
    self.shuffle = bool(check.skewed)
    if self.shuffle:
      logging.warning("%s: options reordered by seed %d, the source's order is skewed (%s)",
                      self.name, self.seed, check.describe())

  def positions(self) -> common.PositionCheck:
    """Gold positions of every split's multiple-choice rows as shown to models."""
    return common.position_check(e for s in self.splits() for e in self.examples(s))

  @property
  def dev(self) -> list[common.Example]:
    return self.examples(self.spec.dev_split)

  @property
  def test(self) -> list[common.Example]:
    return self.examples(self.spec.test_split)

  def check_disjoint(self) -> None:
    """Raises when a question text is in both the dev (or shot) split and the test split."""
    test = [e.question for e in self.test]
    for split in {self.spec.dev_split, self.spec.shot_split}:
      common.check_disjoint((e.question for e in self.examples(split)), test,
                            f"{self.name} {split}/{self.spec.test_split}")


def default_data_dir() -> str:
  return str(assets.cache_root() / "tensorflow_datasets")


def _bigbench_config(tasks: Sequence[str], base: bigbench.BigbenchConfig | None, **overrides
                     ) -> bigbench.BigbenchConfig:
  # "source" joins the key only when set: the sdist's configs keep their names.
  fields = dict(tasks=tuple(tasks), dev_fraction=0.5, seed=0, max_examples_per_task=None)
  if base is not None:
    fields.update(dev_fraction=base.dev_fraction, seed=base.seed,
                  max_examples_per_task=base.max_examples_per_task)
  fields.update({k: v for k, v in overrides.items() if v is not None})
  if base is not None and all(getattr(base, k) == v for k, v in fields.items()):
    return base
  key = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:10]
  return bigbench.BigbenchConfig(name=f"custom_{key}", description=repr(fields), **fields)


MOCO_SPEC = TaskSpec("moco", None, "dev", "test", "dev", "moco", prompt="moco")


def parse_name(name: str) -> tuple[str, tuple[str, ...]]:
  """A task spec, checked without loading anything: ("bigbench", its tasks), ("moco", its file
  names), ("synthetic", its families) or ("named", (name,)) for a TASKS entry. Raises DataError
  naming what is known."""
  listed = tuple(t.strip() for t in name.split(":", 1)[-1].split(",") if t.strip())
  if name.startswith("bigbench:"):
    if not listed:
      raise common.DataError(f"{name!r} names no BIG-bench task (bigbench:task1,task2,...)")
    return "bigbench", listed
  if name.startswith("moco:"):
    names = [t.removeprefix("moco:") for t in listed]  # "moco:bbh,gsm8k" or "moco:bbh,moco:gsm8k".
    if not names:
      raise common.DataError(f"{name!r} names no MoCo task (moco:task1,task2,...; "
                             f"known: {sorted(moco.FILES)})")
    return "moco", moco.file_names(names)
  if name.startswith("synthetic:"):
    unknown = [p for p in listed if p not in synthetic.FAMILIES]
    if not listed or unknown:
      raise common.DataError(f"{name!r}: unknown or no synthetic family {unknown}; known: "
                             f"{sorted(synthetic.FAMILIES)} (synthetic:family1,family2,...)")
    return "synthetic", listed
  if name in TASKS:
    return "named", (name,)
  raise common.DataError(f"unknown task {name!r}; known: {sorted(TASKS)}, "
                         "'bigbench:<task>[,<task>...]', 'moco:<task>[,<task>...]' or "
                         "'synthetic:<family>[,<family>...]'")


def load_task(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
              seed: int | None = None, dev_fraction: float | None = None,
              max_examples_per_task: int | None = None, moco_dir: str | None = None) -> Task:
  """Prepares (once) and opens a task. seed: the option order where the loader shuffles (and,
  BIG-bench, the dev/test split); dev_fraction/max_examples_per_task: BIG-bench only; moco_dir:
  the directory of the MoCo task files (else $SINGLE_MULTI_MOCO_DATA, else the cache/download)."""
  data_dir = data_dir or default_data_dir()
  overrides = dict(seed=seed, dev_fraction=dev_fraction,
                   max_examples_per_task=max_examples_per_task)
  kind, parts = parse_name(name)
  if kind == "synthetic":  # Written once to the cache, then read as a local BIG-bench checkout.
    manual_dir = str(synthetic.write(synthetic.default_root(), parts))
  preset = None  # A named BIG-bench task: its builder config.
  if kind == "named" and TASKS[name].builder == "bigbench":
    preset = next(c for c in bigbench.Bigbench.BUILDER_CONFIGS if c.name == TASKS[name].config)
  if kind in ("bigbench", "synthetic") or preset is not None:
    # Rows read from a local checkout are keyed by its files' digest (see data/bigbench.py).
    root = bigbench.local_root(manual_dir)
    if root is not None:
      overrides["source"] = bigbench.source_digest(root, parts if preset is None else preset.tasks)
  if kind in ("bigbench", "synthetic"):
    spec = TaskSpec("bigbench", None, "dev", "test", "dev", "exact_match")
    builder = bigbench.Bigbench(data_dir=data_dir, config=_bigbench_config(parts, None, **overrides))
  elif kind == "moco":
    spec = MOCO_SPEC
    builder = moco.Moco(data_dir=data_dir,
                        config=moco.builder_config(parts, moco.source_dir(parts, moco_dir)))
  else:
    spec = TASKS[name]
    if preset is not None:
      builder = bigbench.Bigbench(data_dir=data_dir,
                                  config=_bigbench_config(preset.tasks, preset, **overrides))
    elif spec.builder == "mmlu":
      builder = mmlu.Mmlu(data_dir=data_dir, config=spec.config)
    else:
      builder = gsm8k.Gsm8k(data_dir=data_dir)
  common.prepare(builder, manual_dir)
  return Task(name, spec, builder, seed=seed or 0)


def from_config(name: str, config) -> Task:
  """`load_task` with a run config's seed and data locations (`moco_data_dir`,
  `data_manual_dir`)."""
  return load_task(name, seed=config.seed, moco_dir=config.get("moco_data_dir") or None,
                   manual_dir=config.get("data_manual_dir") or None)
