"""GSM8K grade-school math word problems, from the official JSONL files, made offline-aware.

Online, the official files (`train.jsonl`, `test.jsonl`, github.com/openai/grade-school-math,
the URLs of TFDS's catalog builder) are downloaded once. A manual dir holding those files
(`--config.data_manual_dir`) is used instead when given. Offline without one, preparing fails
within seconds with a message saying what to provide. Rows use the common schema: the question,
targets = (the final answer after "####",), solution = the full worked answer; ids
`gsm8k/<split>/<i>` follow the file's line order (line i + 1). A line that cannot be read (not
UTF-8, blank, not JSON, no question or answer, no "####") is kept as a bad row whose `problem`
names the file and the line, so the run counts and lists it (as MMLU's bad rows) instead of
aborting.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator

import tensorflow_datasets as tfds
from tensorflow_datasets.text.gsm8k import gsm8k as catalog

from single_multi.data import common

FILES = ("train", "test", "train_socratic", "test_socratic")
URLS = catalog._URLS  # pylint: disable=protected-access


def _row(line: bytes) -> tuple[str, str, str, str]:
  """(question, final answer, problem, the full worked answer) of one JSONL line."""
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as e:
    return "", "", f"not UTF-8 ({e.reason} at byte {e.start})", ""
  if not text.strip():
    return "", "", "blank line", ""
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    return "", "", f"not JSON ({e.msg} at column {e.colno})", ""
  if not isinstance(record, dict):
    return "", "", f"a JSON {type(record).__name__}, not an object", ""
  question, answer = record.get("question"), record.get("answer")
  if not isinstance(question, str) or not question.strip():
    return "", "", "no 'question'", ""
  if not isinstance(answer, str):
    return question, "", "no 'answer'", ""
  if "####" not in answer:
    return question, "", "no '####' final answer in 'answer'", ""
  return question, answer.rsplit("####", 1)[1].strip(), "", answer.strip()


def examples(path: pathlib.Path, split: str) -> Iterator[common.Example]:
  """Every line of a GSM8K JSONL file as an Example (bad lines with their file and line)."""
  lines = path.read_bytes().split(b"\n")
  if lines and not lines[-1]:
    lines.pop()  # The file's final newline.
  for i, line in enumerate(lines):
    question, short, problem, solution = _row(line.rstrip(b"\r"))
    yield common.Example(f"gsm8k/{split}/{i}", "gsm8k", question,
                         targets=(short,) if short else (), solution=solution,
                         problem=f"{path.name} line {i + 1}: {problem}" if problem else "")


class Gsm8k(common.TaskBuilder, skip_registration=True):
  """GSM8K grade-school math word problems (train 7473 / test 1319)."""

  VERSION = tfds.core.Version("2.1.0")
  RELEASE_NOTES = {"1.0.0": "TFDS's catalog builder.",
                   "2.0.0": "The common schema; ids in line order; unreadable lines kept as bad "
                            "rows naming their file and line.",
                   "2.1.0": "The full worked answer as `solution` (the Co-LLM reference trains "
                            "on it)."}
  HOMEPAGE = "https://github.com/openai/grade-school-math"

  def _split_generators(self, dl_manager):
    manual = common.manual_dir(dl_manager)
    if manual is not None and (manual / "test.jsonl").exists():
      paths = {k: manual / f"{k}.jsonl" for k in FILES if (manual / f"{k}.jsonl").exists()}
    else:
      common.require_online(
          URLS["test"], "GSM8K",
          "Offline, download train.jsonl and test.jsonl from "
          "https://github.com/openai/grade-school-math (grade_school_math/data/) on a machine "
          "that is online and pass their directory as the manual dir "
          "(--config.data_manual_dir=DIR), or copy a prepared TFDS data dir.")
      paths = {k: pathlib.Path(p) for k, p in dl_manager.download(URLS).items()}
    return {k: self._generate_examples(examples(pathlib.Path(p), k)) for k, p in paths.items()}
