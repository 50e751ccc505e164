"""GSM8K through the TFDS catalog builder (`tensorflow_datasets.text.gsm8k`), made offline-aware.

Online, the catalog builder downloads the official JSONL files. A manual dir holding those files
(`train.jsonl`, `test.jsonl`, from github.com/openai/grade-school-math) is used instead when given.
Offline without one, preparing fails within seconds with a message saying what to provide (instead
of the download manager's retries). Rows keep the catalog's fields (question, answer, annotation,
short_answer); `to_example` maps them to the common schema (targets = [short_answer]).
"""

from __future__ import annotations

from tensorflow_datasets.text.gsm8k import gsm8k as catalog

from single_multi.data import common

FILES = ("train", "test", "train_socratic", "test_socratic")


class Gsm8k(catalog.Gsm8k, skip_registration=True):
  """GSM8K grade-school math word problems (train 7473 / test 1319)."""

  def _split_generators(self, dl_manager):
    manual = common.manual_dir(dl_manager)
    if manual is not None and (manual / "test.jsonl").exists():
      return {k: self._generate_examples(manual / f"{k}.jsonl") for k in FILES
              if (manual / f"{k}.jsonl").exists()}
    common.require_online(
        catalog._URLS["test"], "GSM8K",  # pylint: disable=protected-access
        "Offline, download train.jsonl and test.jsonl from "
        "https://github.com/openai/grade-school-math (grade_school_math/data/) on a machine that "
        "is online and pass their directory as the manual dir (--config.data_manual_dir=DIR), or "
        "copy a prepared TFDS data dir.")
    return super()._split_generators(dl_manager)


def to_example(index: int, record, split: str) -> common.Example:
  get = lambda k: common._text(record[k])  # pylint: disable=protected-access
  return common.Example(f"gsm8k/{split}/{index}", "gsm8k", get("question"),
                        targets=(get("short_answer").strip(),))
