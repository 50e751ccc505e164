"""The one example schema every task builder writes, row validation, seeded splits, overlap checks.

Every builder (mmlu, bigbench; gsm8k through an adapter) produces the same fields, so prompts,
pipelines and metrics are written once:

  id        unique within a split, e.g. "abstract_algebra/test/12" or "navigate/417"
  subject   MMLU subject or BIG-bench (sub)task name
  question  the text the model is asked (BIG-bench: task prefix + input)
  choices   option texts; empty for generative tasks
  answer    index of the (first) correct option; -1 for generative tasks
  targets   every acceptable answer text (MC: the correct options' texts; generative: aliases)
  option_order  (MC, set at load, never stored by a builder) the source index of each shown option
            when the loader reordered them (`shuffle_options`); empty: the source's order
  problem   "" for a valid row, else why the row is unusable ("no target", "answer index 7 out of
            range for 4 choices", "file x.csv is not UTF-8 ..."). Bad rows are kept in the data
            so every consumer counts and reports them by id instead of losing them silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import pathlib
import socket
import string
import urllib.parse
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging


class DataError(ValueError):
  """Unusable data or an unreachable source; the message names the thing and the fix."""


FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "subject": tfds.features.Text(),
    "question": tfds.features.Text(),
    "choices": tfds.features.Sequence(tfds.features.Text()),
    "answer": np.int32,
    "targets": tfds.features.Sequence(tfds.features.Text()),
    "problem": tfds.features.Text(),
    "solution": tfds.features.Text(),
})


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class Example:
  id: str
  subject: str
  question: str
  choices: tuple[str, ...] = ()
  answer: int = -1
  targets: tuple[str, ...] = ()
  problem: str = ""
  option_order: tuple[int, ...] = ()
  solution: str = ""  # A worked solution where the source has one (GSM8K's full answer), else "".

  @property
  def is_mc(self) -> bool:
    return bool(self.choices)

  @property
  def correct(self) -> frozenset[int]:
    """Indices of every correct option (an option is correct when its text is a target)."""
    return frozenset(i for i, c in enumerate(self.choices) if c in self.targets)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["choices"], d["targets"] = list(self.choices), list(self.targets)
    d["option_order"] = list(self.option_order)
    return d

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "Example":
    """From a data-source record (TFDS gives bytes for text) or a `to_dict` result."""
    return cls(id=_text(record["id"]), subject=_text(record["subject"]),
               question=_text(record["question"]),
               choices=tuple(_text(c) for c in record["choices"]),
               answer=int(record["answer"]), targets=tuple(_text(t) for t in record["targets"]),
               problem=_text(record["problem"]),
               option_order=tuple(int(i) for i in record.get("option_order", ())),
               solution=_text(record.get("solution", "")))


def validate(ex: Example) -> Example:
  """The example with `problem` set when it cannot be scored (a problem already set is kept)."""
  problem = ex.problem
  if not problem:
    if not ex.question.strip():
      problem = "empty question"
    elif ex.is_mc:
      if any(not c.strip() for c in ex.choices):
        problem = "empty choice text"
      elif not 0 <= ex.answer < len(ex.choices):
        problem = f"answer index {ex.answer} out of range for {len(ex.choices)} choices"
    elif ex.answer != -1:
      problem = "empty choices" if ex.answer >= 0 else f"invalid answer index {ex.answer}"
    elif not any(t.strip() for t in ex.targets):
      problem = "no target"
  return dataclasses.replace(ex, problem=problem)


def bad_file(path: str, subject: str, reason: str) -> Example:
  """A placeholder row standing for a whole unreadable file, so the run summary names it."""
  return Example(id=f"file:{path}", subject=subject, question="", problem=f"{path}: {reason}")


# -------------------------------------------------------------------------------------------------
# Seeded splits and leakage checks.


def normalize_question(text: str) -> str:
  return " ".join(text.lower().split())


def split_fraction(text: str, seed: int) -> float:
  """A uniform number in [0, 1) fixed by (seed, normalised text): identical questions always land
  in the same split, so a seeded split can never put one question text in both dev and test."""
  digest = hashlib.sha256(f"{seed}\x00{normalize_question(text)}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def balanced(examples: Iterable[Example], total: int, seed: int) -> list[Example]:
  """`total` valid rows split evenly over the subjects (task families): round robin in subject
  order, so the counts differ by at most one unless a family runs out (its share then goes to the
  others). Each family's rows are taken in a seeded order fixed by their ids, so the selection is
  stable and never depends on file order; the result is grouped by subject."""
  by: dict[str, list[Example]] = {}
  for e in examples:
    if not e.problem:
      by.setdefault(e.subject, []).append(e)
  for rows in by.values():  # Salted: independent of every other split_fraction(id, seed) use.
    rows.sort(key=lambda e: split_fraction("balanced\x00" + e.id, seed))
  subjects = sorted(by)
  quota, left = dict.fromkeys(subjects, 0), total
  while left > 0 and any(quota[s] < len(by[s]) for s in subjects):
    for s in subjects:
      if left > 0 and quota[s] < len(by[s]):
        quota[s] += 1
        left -= 1
  return [e for s in subjects for e in by[s][:quota[s]]]


def composition(examples: Iterable[Example]) -> dict[str, int]:
  """Valid rows per subject, in subject order."""
  counts: dict[str, int] = {}
  for e in examples:
    if not e.problem:
      counts[e.subject] = counts.get(e.subject, 0) + 1
  return dict(sorted(counts.items()))


def overlapping_questions(a: Iterable[str], b: Iterable[str]) -> set[str]:
  """Normalised question texts present in both collections."""
  return ({normalize_question(q) for q in a if q.strip()}
          & {normalize_question(q) for q in b if q.strip()})


def check_disjoint(dev: Iterable[str], test: Iterable[str], what: str) -> None:
  shared = overlapping_questions(dev, test)
  if shared:
    sample = "; ".join(sorted(s[:80] for s in shared)[:3])
    raise DataError(f"{what}: {len(shared)} question text(s) appear in both dev and test "
                    f"(e.g. {sample}); results on this split would be contaminated")


# -------------------------------------------------------------------------------------------------
# Option order: where the gold option sits, and a seeded reordering.

# A gold position is "skewed" when it holds more than this many times its uniform share.
SKEW_FACTOR = 2.0
# Fewer multiple-choice rows than this (in a task, or in one of its subjects) are too few to judge
# by their position counts; a small subject's rows still count in its task's total.
MIN_ROWS_FOR_SKEW = 20
# A position that a uniform placement fills fewer times than this (a rare 10th option) is not judged:
# one row there would already count as "more than twice".
MIN_EXPECTED = 5.0


def _option_rng(seed: int, ex_id: str) -> np.random.Generator:
  digest = hashlib.sha256(f"options\x00{seed}\x00{ex_id}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def shuffle_options(ex: Example, seed: int) -> Example:
  """The example with its options in a random order fixed by (seed, example id): the same in every
  round, process and run with that seed. The gold index moves with its option; `option_order`
  records the source index of each shown option. Generative rows come back unchanged."""
  if not ex.is_mc or ex.option_order:
    return ex
  perm = _option_rng(seed, ex.id).permutation(len(ex.choices))
  answer = int(np.flatnonzero(perm == ex.answer)[0]) if 0 <= ex.answer < len(perm) else ex.answer
  return dataclasses.replace(ex, choices=tuple(ex.choices[i] for i in perm), answer=answer,
                             option_order=tuple(int(i) for i in perm))


@dataclasses.dataclass(frozen=True)
class PositionCheck:
  """Where the gold option sits in a set of multiple-choice rows.

  counts[p]: rows whose gold option is at position p; expected[p]: the count a uniform placement
  gives (each row adds 1/n_options to each of its positions); skewed: the positions holding more
  than SKEW_FACTOR times their expected count, over all rows ("*") and per subject, each judged
  where it has at least MIN_ROWS_FOR_SKEW rows, at positions expected at least MIN_EXPECTED times.
  """
  rows: int
  counts: tuple[int, ...]
  expected: tuple[float, ...]
  skewed: tuple[tuple[str, int, float], ...]  # (subject or "*", position, share of its rows)

  @property
  def shares(self) -> tuple[float, ...]:
    return tuple(c / self.rows for c in self.counts) if self.rows else ()

  def describe(self) -> str:
    letters = string.ascii_uppercase  # As metrics.LETTERS.
    cells = ", ".join(f"{letters[p]} {s:.0%}" for p, s in enumerate(self.shares))
    where = "; ".join(f"{subj}: {letters[p]} holds {share:.0%}" for subj, p, share in self.skewed)
    return f"gold positions over {self.rows} rows: {cells}" + (f" (skewed: {where})" if where
                                                                else "")


def _counts(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
  width = max((len(e.choices) for e in examples), default=0)
  counts, expected = np.zeros(width, np.int64), np.zeros(width)
  for e in examples:
    counts[e.answer] += 1
    expected[:len(e.choices)] += 1.0 / len(e.choices)
  return counts, expected


def position_check(examples: Iterable[Example]) -> PositionCheck:
  """The gold-position distribution of the valid multiple-choice rows (see PositionCheck)."""
  mc = [e for e in examples if e.is_mc and not e.problem]
  groups: dict[str, list[Example]] = {"*": mc}
  for e in mc:
    groups.setdefault(e.subject, []).append(e)
  skewed, total = [], _counts(mc)
  for name, rows in groups.items():
    if len(rows) < MIN_ROWS_FOR_SKEW:
      continue
    counts, expected = total if name == "*" else _counts(rows)
    skewed += [(name, int(p), float(counts[p] / len(rows)))
               for p in np.flatnonzero((counts > SKEW_FACTOR * expected)
                                       & (expected >= MIN_EXPECTED))]
  return PositionCheck(len(mc), tuple(int(c) for c in total[0]),
                       tuple(float(x) for x in total[1]), tuple(skewed))


# -------------------------------------------------------------------------------------------------
# TFDS plumbing shared by the builders.


class TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base for builders that write `FEATURES` rows (array_record; TensorFlow is not needed)."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=FEATURES,
                                 homepage=getattr(self, "HOMEPAGE", None))

  def _generate_examples(self, examples: Iterable[Example]):
    seen = set()
    for ex in examples:
      ex = validate(ex)
      if ex.id in seen:
        raise DataError(f"{self.name}: duplicate example id {ex.id!r}")
      seen.add(ex.id)
      if ex.option_order:
        raise DataError(f"{self.name}: {ex.id!r} was reordered before storage; builders keep the "
                        "source's option order (the loader shuffles, see shuffle_options)")
      record = ex.to_dict()
      del record["option_order"]
      yield ex.id, record


def manual_dir(dl_manager) -> "pathlib.Path | None":
  """The download manager's manual dir when it is given and holds files, else None (TFDS's public
  `manual_dir` property raises when it is missing; for these builders it is optional)."""
  return nonempty_dir(dl_manager._manual_dir)  # pylint: disable=protected-access


def nonempty_dir(path) -> "pathlib.Path | None":
  """`path` when it is a directory holding something, else None."""
  if path is not None and pathlib.Path(path).is_dir() and any(pathlib.Path(path).iterdir()):
    return pathlib.Path(path)
  return None


def require_online(url: str, what: str, fix: str, timeout: float = 5.0) -> None:
  """Fails within `timeout` seconds with a clear message when `url`'s host is unreachable."""
  host = urllib.parse.urlparse(url).hostname
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
  except OSError as e:
    raise DataError(f"{what} must be downloaded from {url}, but {host} is unreachable ({e}). "
                    f"{fix}") from e


TFDS_PRINT = "tfds: "  # Prefixes TFDS's own prints, logged at INFO (the console leaves them out).


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None) -> None:
  """Builds the array_record files once (a no-op when they exist)."""
  config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
  tfds.disable_progress_bar()  # Its "Generating" / "Shuffling ... incomplete" bars: not ours.
  printed = io.StringIO()  # Its "Downloading and preparing dataset ..." lines: to the log.
  with contextlib.redirect_stdout(printed):
    builder.download_and_prepare(download_config=config, file_format="array_record")
  for line in printed.getvalue().splitlines():
    if line.strip():
      logging.info("%s%s", TFDS_PRINT, line.strip())


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> Sequence[Mapping[str, Any]]:
  """The random-access data source of a prepared split (grain reads it directly)."""
  return builder.as_data_source(split=split)
