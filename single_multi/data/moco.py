"""The single-multi paper's 15 tasks as its reference toolkit publishes them, as a TFDS builder.

Source: one JSON file per task in the MoCo toolkit (GitHub BunsenFeng/model_collaboration,
`model_collaboration/data/<task>.json` at commit `COMMIT`; LGPL-3.0), each with `task_type` and the
published `dev` and `test` splits, kept as published. The files are read from, in order:
  1. a local directory: `load_task(..., moco_dir=)` (the loop's `config.moco_data_dir`), else
     `$SINGLE_MULTI_MOCO_DATA`;
  2. the cache (`<cache>/moco_data/`), filled once from the toolkit's repository at `COMMIT` when
     online; each download is checked against its pinned sha256 (a mismatch is an error and
     nothing is cached).
Offline with neither, loading fails within seconds with a message naming both options.

Rows (common.Example): multiple choice from `question` and the `choices` object (options lettered
by position, as the reference letters them; `answer` is a key of `choices`); the other types from
`input`, with `output` as the target (popqa: its string-encoded alias list, parsed). The subject
is the task's name, so a mixture (`moco:bbh,gsm8k`) reports per task, and the metric ("moco")
follows each row's task type (evaluate.py; rules in metrics.py).

Quirks of the published files, handled and reported at preparation (the reference's scorer trips
on them): option keys that are not A, B, C, ... (26 arc_challenge rows use 1-4, 29
tablemwp_multiple_choice rows a 4th key `id`): mapped by position like the reference's letters,
so they stay scorable here (the reference never scores them) and are counted in the log; ids that
repeat within a split (blend, math): examples are named `<task>/<split>/<row>` instead; question
texts present in both splits (agieval 5, arc_challenge 2, mmlu_redux 10, popqa 23, sciriff 9,
theoremqa 1 of the test rows): kept as published, counted in the log. Gold positions are already
balanced in the multiple-choice files, so the loader keeps their order (the check still runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import tensorflow_datasets as tfds
from absl import logging

from single_multi import assets
from single_multi.data import common, metrics

COMMIT = "ecea545acdd3f49e9f9fa46a6dedcb076ed476b1"
URL = ("https://raw.githubusercontent.com/BunsenFeng/model_collaboration/" + COMMIT
       + "/model_collaboration/data/{file}.json")
ENV = "SINGLE_MULTI_MOCO_DATA"

# file -> (task_type, sha256 of the published file at COMMIT).
FILES = {
    "agieval": ("multiple_choice",
                "1864b93a8e88b5bcd651936d763082ea6d00a92d56fc87f48384d5d6e8ec1f37"),
    "arc_challenge": ("multiple_choice",
                      "9b67593b3d4f904b6dfa955bb1bc31a321536ddad28ef1faa249c56d21ef70fa"),
    "mmlu_redux": ("multiple_choice",
                   "d32f9a4ae695b3826e628d371f1b663621e72a95275339645c0ed01ebfedaeb6"),
    "bbh": ("exact_match", "ee44d7bb83f25998ba31337db9ceb3a1699b3508e3ec8b590d048c843bbd45a6"),
    "gsm8k": ("exact_match", "fa803a5cd0c0d615f705a5641a8f77dbffbecc610392402e99e70358db29d798"),
    "math": ("exact_match", "4360c8bac1ede11cdd03f97ed56a2937ac65bd6b00e1eddec21db461e5a9847b"),
    "gpqa_diamond": ("multiple_choice",
                     "ae0b25ddee7ba4ed9c2cd219176f06419d6b925fabdd5ebaf12bf9c9a7803ffd"),
    "tablemwp_free_text": ("exact_match",
                           "83c9c52741a4706bacff34a866e44314cd77ccb2bebcd9f37647aa9da8d7ff7e"),
    "tablemwp_multiple_choice": ("multiple_choice",
                                 "00b2e0a997e09364da8148630ba707bfe8831ef5d563f52bcbf46b7b28333f37"),
    "theoremqa": ("exact_match",
                  "7bf19c9eb0d9988db58870fe29c43e7e473117dc6a16efe0e1aa4f3af397a19c"),
    "wikidyk": ("f1_match", "7b7d6d8ffbc7cc2e3736de6d8736560a44bd5552915f5e12cb5ef8fb12ca44e5"),
    "popqa": ("f1_match", "5f6cc194178b8cc4af39412aa051c1a5613d35bd1f5eae02a4aecb847735d089"),
    "blend": ("multiple_choice", "113b34026b41252749d2fa3350ef8afdbfa94b6eeec12157237fda61bea54d6a"),
    "truthfulqa": ("multiple_choice",
                   "03652c961453ca91eb44cbcd2b42853749752687b24928efdc3eb9a7d0bbc089"),
    "sciriff": ("exact_match", "8cd3d6ed2d27f3b20a391b902dde90a1c85022488b2f8c0cd89d4ac4df68e457"),
    "human_interest": ("reward_model",
                       "ccd78bc85644a2562d87cec75e4e056c9c257ba86ee0fd8009e83e850f2cf293"),
}
# The paper's 15 tasks; "tablemwp" is its two files.
PAPER_TASKS = ("agieval", "arc_challenge", "mmlu_redux", "bbh", "gsm8k", "math", "gpqa_diamond",
               "tablemwp", "theoremqa", "wikidyk", "popqa", "blend", "truthfulqa", "sciriff",
               "human_interest")
ALIASES = {"tablemwp": ("tablemwp_free_text", "tablemwp_multiple_choice")}
F1_TASKS = frozenset(f for f, (kind, _) in FILES.items() if kind == "f1_match")
REWARD_TASKS = frozenset(f for f, (kind, _) in FILES.items() if kind == "reward_model")


def file_names(tasks: Sequence[str]) -> tuple[str, ...]:
  """Task names (paper names or file names) -> file names, in order, each once."""
  out = []
  for t in tasks:
    names = ALIASES.get(t, (t,))
    for n in names:
      if n not in FILES:
        raise common.DataError(f"unknown MoCo task {t!r}; known: {sorted(set(FILES) | set(ALIASES))}")
      out.append(n)
  return tuple(dict.fromkeys(out))


# -------------------------------------------------------------------------------------------------
# Where the files come from.


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def source_dir(files: Sequence[str], moco_dir: str | None = None) -> pathlib.Path:
  """The directory holding `files` (see the module docstring for the order)."""
  local = moco_dir or os.environ.get(ENV)
  if local:
    root = pathlib.Path(local).expanduser()
    missing = [f"{f}.json" for f in files if not (root / f"{f}.json").is_file()]
    if missing:
      where = "moco_data_dir" if moco_dir else f"${ENV}"
      raise common.DataError(f"{where}={root} lacks {missing}; it should hold the toolkit's "
                             "model_collaboration/data/<task>.json files")
    for f in files:
      if _sha256(root / f"{f}.json") != FILES[f][1]:
        logging.warning("%s/%s.json differs from the published file at %s (sha256); results "
                        "will not be comparable with the paper's", root, f, COMMIT[:7])
    return root
  root = assets.cache_root() / "moco_data"
  for f in files:
    if not (root / f"{f}.json").is_file():
      _download(f, root)
  return root


def _download(file: str, root: pathlib.Path) -> None:
  import urllib.request
  url = URL.format(file=file)
  common.require_online(url, f"The MoCo task file {file}.json", (
      f"Offline, copy the toolkit's model_collaboration/data/ files (commit {COMMIT[:7]}) to a "
      f"directory and pass it as --config.moco_data_dir=DIR or set ${ENV}=DIR."))
  try:
    data = urllib.request.urlopen(url, timeout=60).read()
  except OSError as e:
    raise common.DataError(f"could not download {url} ({e}); pass a local copy as "
                           f"--config.moco_data_dir=DIR or ${ENV}=DIR") from e
  digest = hashlib.sha256(data).hexdigest()
  if digest != FILES[file][1]:
    raise common.DataError(f"{url}: sha256 {digest} is not the pinned {FILES[file][1]}; nothing "
                           "was cached")
  root.mkdir(parents=True, exist_ok=True)
  partial = root / f"{file}.json.partial"
  partial.write_bytes(data)
  partial.replace(root / f"{file}.json")


# -------------------------------------------------------------------------------------------------
# Rows.


def to_example(task: str, split: str, index: int, row: dict[str, Any]) -> common.Example:
  """One published row as an Example (problem set when it cannot be scored)."""
  ex_id, kind = f"{task}/{split}/{index}", FILES[task][0]
  if kind == "multiple_choice":
    question, options = row.get("question"), row.get("choices")
    if not isinstance(question, str) or not isinstance(options, dict):
      return common.Example(ex_id, task, str(question or ""), problem="no question or choices")
    keys = list(options)
    choices = tuple(str(options[k]) for k in keys)
    answer = keys.index(row.get("answer")) if row.get("answer") in keys else -2
    problem = "" if answer >= 0 else f"answer {row.get('answer')!r} is not an option key {keys}"
    return common.Example(ex_id, task, question, choices, answer,
                          (choices[answer],) if answer >= 0 else (), problem)
  text = row.get("input")
  if not isinstance(text, str):
    return common.Example(ex_id, task, "", problem="no input")
  if kind == "reward_model":  # Scored by a reward model on (input, reply); `output` is a sample.
    return common.Example(ex_id, task, text, targets=(str(row.get("output") or ""),))
  gold = row.get("output")
  targets = tuple(metrics.alias_list(gold)) if task == "popqa" else (str(gold),)
  return common.Example(ex_id, task, text, targets=targets if gold is not None else ())


def letter_keys(row: dict[str, Any]) -> bool:
  """True when a multiple-choice row's option keys are A, B, C, ... in order."""
  return list(row.get("choices") or {}) == list(metrics.LETTERS[:len(row.get("choices") or {})])


# -------------------------------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass
class MocoConfig(tfds.core.BuilderConfig):
  tasks: tuple[str, ...] = ()  # File names.
  source: str = ""  # The directory read (not part of the data's identity: the hashes are).


def builder_config(tasks: Sequence[str], root: pathlib.Path) -> MocoConfig:
  """A config named by the tasks and their files' contents, so a changed file is prepared anew."""
  files = file_names(tasks)
  key = hashlib.sha256("".join(f + _sha256(root / f"{f}.json") for f in files).encode())
  return MocoConfig(name=f"{'_'.join(files)[:60]}_{key.hexdigest()[:10]}", tasks=files,
                    source=str(root), description=f"MoCo tasks {files}")


class Moco(common.TaskBuilder):
  """The MoCo toolkit's task files: published dev/test splits, every task type."""

  name = "moco"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "A `solution` feature (a worked solution where the source has one)."}
  HOMEPAGE = "https://github.com/BunsenFeng/model_collaboration"

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    splits = {"dev": [], "test": []}
    for task in cfg.tasks:
      path = pathlib.Path(cfg.source) / f"{task}.json"
      try:
        data = json.loads(path.read_bytes().decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        for split in splits:
          splits[split].append(common.bad_file(str(path), task, f"not valid UTF-8 JSON ({e})"))
        continue
      for split in splits:
        rows = data.get(split)
        if not isinstance(rows, list):
          splits[split].append(common.bad_file(str(path), task, f"no {split!r} list"))
          continue
        splits[split] += [to_example(task, split, i, r if isinstance(r, dict) else {})
                          for i, r in enumerate(rows)]
        if FILES[task][0] == "multiple_choice":
          other = sum(not letter_keys(r) for r in rows if isinstance(r, dict))
          if other:
            logging.warning("%s %s: %d rows use option keys other than A, B, C, ...; mapped by "
                            "position (the reference never scores them)", task, split, other)
      shared = common.overlapping_questions((e.question for e in splits["dev"] if e.subject == task),
                                            (e.question for e in splits["test"] if e.subject == task))
      if shared:
        logging.warning("%s: %d question texts are in both published splits (kept as published)",
                        task, len(shared))
    return {split: self._generate_examples(exs) for split, exs in splits.items()}
