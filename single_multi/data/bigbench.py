"""BIG-bench JSON tasks (Srivastava et al., 2022) as a TFDS builder with seeded dev/test splits.

Source: the `task.json` files of `bigbench==1.0.0`, read as data (never installed) from its sdist
on the package index (fetched once into the cache, see `assets.bigbench_tasks_dir`), or from a
local checkout of https://github.com/google/BIG-bench (its root, its `bigbench/` package dir, or
`benchmark_tasks/` itself) passed as the manual dir or named by $SINGLE_MULTI_BIGBENCH (the manual
dir wins). Rows prepared from a local checkout are stored under a config keyed by the digest of the
task files read (`source_digest`), so they never stand in for the sdist's rows or another
checkout's.

A task with subtasks (`logical_deduction/three_objects`, ...) expands to all of them; a subtask can
also be named directly. Examples with `target_scores` become multiple-choice rows (options stored in
file order, which BIG-bench authors often fixed: the correct option last in the arithmetic tasks,
first in date_understanding; the loader shows them in a seeded random order, see `tasks`; every
top-scored option is a target); examples with only `target` (a string or a list
of aliases) become generative rows. The task prefix and an explicit example input prefix are part
of the question text.

BIG-bench has no splits: each example goes to dev or test by a hash of (seed, normalised input), so
the split is deterministic, independent of file order, and one question text is never in both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Iterator

import tensorflow_datasets as tfds

from single_multi import assets
from single_multi.data import common

# The BIG-Bench Hard tasks that exist as JSON in BIG-bench 1.0.0 (20 of 23: boolean_expressions,
# multistep_arithmetic_two and web_of_lies are programmatic there).
BBH = ("causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
       "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton",
       "logical_deduction", "movie_recommendation", "navigate", "object_counting",
       "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
       "salient_translation_error_detection", "snarks", "sports_understanding",
       "temporal_sequences", "tracking_shuffled_objects", "word_sorting")
# Knowledge and factuality.
KNOWLEDGE = ("known_unknowns", "misconceptions", "general_knowledge", "vitaminc_fact_verification",
             "hindu_knowledge", "fact_checker")


@dataclasses.dataclass
class BigbenchConfig(tfds.core.BuilderConfig):
  tasks: tuple[str, ...] = ()
  dev_fraction: float = 0.5
  seed: int = 0
  max_examples_per_task: int | None = None  # Seeded subsample of each (sub)task when set.
  source: str = ""  # "": the sdist; else the digest of the local task files (`source_digest`).


class Bigbench(common.TaskBuilder):
  """BIG-bench JSON tasks: multiple-choice and generative, with seeded dev/test splits."""

  name = "bigbench"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "A `solution` feature (a worked solution where the source has one)."}
  HOMEPAGE = "https://github.com/google/BIG-bench"
  BUILDER_CONFIGS = [
      BigbenchConfig(name="bbh", tasks=BBH, description="BIG-Bench Hard tasks present as JSON."),
      BigbenchConfig(name="knowledge", tasks=KNOWLEDGE, max_examples_per_task=1000,
                     description="Knowledge and factuality tasks (at most 1000 per task)."),
  ]

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    if not cfg.tasks:
      raise common.DataError(f"bigbench config {cfg.name!r} names no tasks")
    if not 0.0 < cfg.dev_fraction < 1.0:
      raise common.DataError(f"dev_fraction must be in (0, 1), got {cfg.dev_fraction}")
    root = local_root(common.manual_dir(dl_manager))
    if root is None:
      try:
        root = assets.bigbench_tasks_dir(cfg.tasks)
      except assets.AssetError as e:
        raise common.DataError(str(e)) from e
    splits = {"dev": [], "test": []}
    for task in cfg.tasks:
      for ex in task_examples(root, task, cfg.seed, cfg.max_examples_per_task):
        if ex.problem and not ex.question:  # A whole unreadable file: report it in both splits.
          splits["dev"].append(ex)
          splits["test"].append(ex)
        else:
          dev = common.split_fraction(ex.question, cfg.seed) < cfg.dev_fraction
          splits["dev" if dev else "test"].append(ex)
    common.check_disjoint((e.question for e in splits["dev"]),
                          (e.question for e in splits["test"]), f"bigbench/{cfg.name}")
    return {split: self._generate_examples(exs) for split, exs in splits.items() if exs}


LOCAL_ENV = "SINGLE_MULTI_BIGBENCH"


def local_root(manual_dir: "str | pathlib.Path | None") -> pathlib.Path | None:
  """The benchmark_tasks/ directory to read instead of the sdist: the manual dir's when one is
  given and holds files, else $SINGLE_MULTI_BIGBENCH's when set, else None (the sdist)."""
  if (manual := common.nonempty_dir(manual_dir)) is not None:
    return tasks_root(manual)
  env = os.environ.get(LOCAL_ENV)
  if not env:
    return None
  path = pathlib.Path(env).expanduser()
  if not path.is_dir():
    raise common.DataError(f"${LOCAL_ENV}={env} is not a directory")
  return tasks_root(path)


def source_digest(root: pathlib.Path, tasks) -> str:
  """A digest of every task.json the tasks read under `root` (paths and bytes)."""
  h = hashlib.sha256()
  for task in tasks:
    for path in sorted((root / task).glob("**/task.json")):
      h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
  return h.hexdigest()[:12]


def tasks_root(path: pathlib.Path) -> pathlib.Path:
  for candidate in (path, path / "benchmark_tasks", path / "bigbench" / "benchmark_tasks"):
    if candidate.name == "benchmark_tasks" and candidate.is_dir():
      return candidate
  raise common.DataError(f"{path} holds no BIG-bench benchmark_tasks/ directory")


def task_examples(root: pathlib.Path, task: str, seed: int = 0,
                  max_examples: int | None = None) -> Iterator[common.Example]:
  """Examples of one task (all its subtasks when it has them) under a benchmark_tasks/ dir."""
  task_dir = root / task
  if not (task_dir / "task.json").exists():
    raise common.DataError(f"BIG-bench task {task!r}: no {task_dir / 'task.json'} (programmatic "
                           "tasks, with only task.py, are not supported)")
  subtasks = sorted(p.parent for p in task_dir.glob("*/task.json"))
  for path in subtasks or [task_dir]:
    yield from _file_examples(path / "task.json", path.relative_to(root).as_posix(), seed,
                              max_examples)


def _file_examples(path: pathlib.Path, name: str, seed: int, max_examples: int | None
                   ) -> Iterator[common.Example]:
  try:
    spec = json.loads(path.read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    yield common.bad_file(f"{name}/task.json", name, f"not UTF-8 ({e})")
    return
  except json.JSONDecodeError as e:
    yield common.bad_file(f"{name}/task.json", name, f"not valid JSON ({e})")
    return
  yield from spec_examples(spec, name, seed, max_examples)


def spec_examples(spec: dict, name: str, seed: int = 0, max_examples: int | None = None
                  ) -> Iterator[common.Example]:
  """Examples of one parsed task.json (no subtasks), ids "<name>/<index in the file>"."""
  examples = spec.get("examples") or []
  order = range(len(examples))
  if max_examples is not None and len(examples) > max_examples:
    # A seeded subsample, independent of the dev/test hash (different salt).
    order = sorted(order, key=lambda i: common.split_fraction(
        f"{i}\x00{examples[i].get('input', '')}", seed + 7919))[:max_examples]
    order = sorted(order)
  prefix = (spec.get("task_prefix") or "").strip()
  input_prefix = (spec.get("example_input_prefix") or "").strip()
  for i in order:
    yield _example(examples[i], f"{name}/{i}", name, prefix, input_prefix)


def _example(raw: dict, ex_id: str, subject: str, prefix: str, input_prefix: str
             ) -> common.Example:
  text = raw.get("input")
  if not isinstance(text, str):
    return common.Example(ex_id, subject, "", problem="no input")
  body = f"{input_prefix} {text}" if input_prefix else text
  question = f"{prefix}\n{body}" if prefix else body
  aliases = raw.get("target")
  aliases = [aliases] if isinstance(aliases, str) else [str(a) for a in aliases or []]
  scores = raw.get("target_scores")
  if scores is None:
    return common.Example(ex_id, subject, question, targets=tuple(aliases))
  choices = tuple(str(c) for c in scores)
  if not choices:
    return common.Example(ex_id, subject, question, answer=0, problem="empty choices")
  best = max(scores.values())
  correct = [c for c, s in zip(choices, scores.values()) if s == best and best > 0]
  if not correct:
    return common.Example(ex_id, subject, question, choices, -2,
                          problem="no option has a positive score")
  targets = tuple(dict.fromkeys(correct + aliases))
  return common.Example(ex_id, subject, question, choices, choices.index(correct[0]), targets)
