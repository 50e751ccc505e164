"""MMLU (Hendrycks et al., 2021) as a TFDS builder: 57 subjects; splits dev (the 5-shot
exemplars), validation and test; fields question, choices, answer, subject (see data/common.py).

Sources, in order:
  1. a manual dir (`--config.data_manual_dir` / `DownloadConfig(manual_dir=)`) holding any of
     - the official archive `data.tar` (or any *.tar / *.tar.gz with the same layout),
     - its extracted CSVs: `data/{dev,val,test}/<subject>_{dev,val,test}.csv`
       (no header; question, A, B, C, D, answer letter),
     - the parquet copy many users have locally (the `cais/mmlu` layout:
       `<subject>/{dev,validation,test}-00000-of-00001.parquet` with columns question, subject,
       choices, answer; an `all/` directory is used only when no per-subject directory exists);
  2. the official archive through the TFDS download manager, when online.
Offline without a manual dir, preparing fails at once with a message saying what to provide.

Config "redux" keeps the 30 subjects of MMLU-Redux (Gema et al., 2024) with the original labels;
the re-annotated labels live only in the MMLU-Redux release, which this builder also reads when
its parquet files (with an `error_type` column) are in the manual dir: rows whose error_type is
not "ok" are then marked bad (and so reported and excluded), as MMLU-Redux recommends.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import re
import tarfile
from typing import Iterator

import tensorflow_datasets as tfds

from single_multi.data import common

URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
SPLITS = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test"}
REDUX_SUBJECTS = (
    "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "conceptual_physics", "econometrics", "electrical_engineering", "formal_logic", "global_facts",
    "high_school_chemistry", "high_school_geography", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_physics", "high_school_statistics",
    "high_school_us_history", "human_aging", "logical_fallacies", "machine_learning",
    "miscellaneous", "philosophy", "professional_accounting", "professional_law",
    "public_relations", "virology")

_CSV = re.compile(r"(?:^|/)(dev|val|test)/([a-z_]+)_(dev|val|test)\.csv$")
_PARQUET = re.compile(r"(?:^|/)(?:([a-z_]+)/)?(dev|validation|test)-\d+-of-\d+\.parquet$")


@dataclasses.dataclass
class MmluConfig(tfds.core.BuilderConfig):
  subjects: tuple[str, ...] | None = None  # None: every subject in the source.


class Mmlu(common.TaskBuilder):
  """MMLU: 57-subject multiple-choice exam questions (4 options)."""

  name = "mmlu"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "A `solution` feature (a worked solution where the source has one)."}
  HOMEPAGE = "https://github.com/hendrycks/test"
  BUILDER_CONFIGS = [
      MmluConfig(name="all", description="All subjects."),
      MmluConfig(name="redux", subjects=REDUX_SUBJECTS,
                 description="The 30 MMLU-Redux subjects."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put the official archive ({URL}), its extracted data/ CSV tree, or a parquet copy "
      "(<subject>/<split>-00000-of-00001.parquet) in the manual dir.")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual = common.manual_dir(dl_manager)
    if manual is not None:
      files = list(_files(manual))
    else:
      common.require_online(URL, "MMLU", "Offline, pass a manual dir (--config.data_manual_dir="
                            "DIR; load_task(..., manual_dir=DIR)): "
                            + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
      files = list(_files(pathlib.Path(dl_manager.download(URL))))
    rows = {"dev": [], "validation": [], "test": []}
    for ex, split in _examples(files):
      if self.builder_config.subjects is None or ex.subject in self.builder_config.subjects:
        rows[split].append(ex)
    found = {ex.subject for split in rows.values() for ex in split if not ex.problem}
    if not found:
      raise common.DataError(f"no MMLU CSV or parquet files found in {manual or URL}. "
                             + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    if self.builder_config.subjects is not None:
      missing = sorted(set(self.builder_config.subjects) - found)
      if missing:
        raise common.DataError(f"MMLU config {self.builder_config.name!r}: subjects {missing} "
                               f"are not in {manual or URL}")
    return {split: self._generate_examples(exs) for split, exs in rows.items() if exs}


def _files(root: pathlib.Path) -> Iterator[tuple[str, bytes]]:
  """(relative path, bytes) of every CSV/parquet file under a dir or inside tar archives."""
  paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
  for path in paths:
    name = path.name
    if name.endswith((".tar", ".tar.gz", ".tgz")):
      with tarfile.open(path) as tar:
        for member in tar:
          if member.isfile() and member.name.endswith((".csv", ".parquet")):
            yield member.name, tar.extractfile(member).read()
    elif name.endswith((".csv", ".parquet")):
      yield str(path.relative_to(root if root.is_dir() else root.parent)), path.read_bytes()


def _examples(files: list[tuple[str, bytes]]) -> Iterator[tuple[common.Example, str]]:
  parquet = [(p, d) for p, d in files if _PARQUET.search(p)]
  has_subject_dirs = any(_PARQUET.search(p).group(1) not in (None, "all") for p, _ in parquet)
  for path, data in files:
    if m := _CSV.search(path):
      subject, split = m.group(2), SPLITS[m.group(1)]
      yield from ((ex, split) for ex in _csv_rows(path, data, subject, split))
    elif m := _PARQUET.search(path):
      folder, split = m.group(1), SPLITS[m.group(2)]
      if has_subject_dirs and folder in (None, "all"):
        continue  # The per-subject files hold the same rows.
      yield from ((ex, split) for ex in _parquet_rows(path, data, folder, split))


def _csv_rows(path: str, data: bytes, subject: str, split: str) -> Iterator[common.Example]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    yield common.bad_file(path, subject, f"not UTF-8 ({e})")
    return
  for i, row in enumerate(csv.reader(io.StringIO(text))):
    ex_id = f"{subject}/{split}/{i}"
    if len(row) < 3:
      yield common.Example(ex_id, subject, row[0] if row else "", problem=f"{len(row)} columns")
      continue
    question, choices, letter = row[0], tuple(row[1:-1]), row[-1].strip().upper()
    answer = ord(letter) - ord("A") if len(letter) == 1 and letter.isalpha() else -2
    targets = (choices[answer],) if 0 <= answer < len(choices) else ()
    problem = "" if letter else "no target"
    if answer == -2 and letter:
      problem = f"answer {letter!r} is not a letter"
    yield common.Example(ex_id, subject, question, choices, answer, targets, problem)


def _parquet_rows(path: str, data: bytes, folder: str | None, split: str
                  ) -> Iterator[common.Example]:
  try:
    import pyarrow.parquet as pq
  except ImportError as e:
    raise common.DataError("reading MMLU parquet files needs pyarrow (pip install pyarrow)") from e
  table = pq.read_table(io.BytesIO(data)).to_pylist()
  for i, row in enumerate(table):
    subject = row.get("subject") or folder or "unknown"
    choices = tuple(row.get("choices") or ())
    answer = row.get("answer")
    if isinstance(answer, str):  # Some copies store the letter.
      answer = ord(answer.strip().upper()) - ord("A") if answer.strip() else None
    problem = "no target" if answer is None else ""
    if row.get("error_type") not in (None, "ok"):
      problem = f"MMLU-Redux error_type {row['error_type']!r}"
    answer = -2 if answer is None else int(answer)
    targets = (choices[answer],) if 0 <= answer < len(choices) else ()
    yield common.Example(f"{subject}/{split}/{i}", subject, row.get("question") or "", choices,
                         answer, targets, problem)
