"""Generated task families: exact-match tasks written by code, so they need no download.

  load_task("synthetic:number_words,reverse_words,key_value")

Each family is a fixed list of `ROWS` rows drawn by a generator seeded with the family's name
(the rows do not depend on any run's seed), with duplicate inputs dropped. The rows are written
as BIG-bench `task.json` files under `<cache>/synthetic/v<VERSION>/benchmark_tasks/` (rewritten
whenever the generator's output differs from the file) and read by the BIG-bench builder
(data/bigbench.py) like a local checkout: a seeded hash of each question puts it in dev or test, and
the prepared rows are keyed by the digest of the files, so a changed generator is a new dataset,
never stale rows. Each family's rows carry a one-line instruction (`INSTRUCTIONS`, the task
file's `task_prefix`, so the question is "<instruction>\n<input>"): a model distilled on several
families must know which mapping a row asks for, and bare inputs do not say it (number_words'
"4342" and sort_numbers' "42 7 19 88" are both digits; a member distilled on both spelled sort
answers out, see configs/quickstart.py). The targets have no punctuation, so the SQuAD
normalisation of exact match cannot merge two answers.

Families (chance level 0: every answer is a free string):
  number_words   "4342" -> "four thousand three hundred forty two" (0-9999)
  reverse_words  "river stone lamp" -> "lamp stone river" (3-5 lower-case nouns)
  key_value      "k=4 q=9 z=2 ; q" -> "9" (3-5 distinct letters, one asked)
  acronym        "Silver Harbor Lamp" -> "SHL" (3-4 capitalised nouns)
  sort_numbers   "42 7 19 88" -> "7 19 42 88" (4 distinct numbers, 1-99)
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import zlib
from typing import Callable

import numpy as np

from single_multi import assets
from single_multi.data import common

VERSION = 1
ROWS = 2000  # Rows attempted per family (duplicate inputs dropped).

NOUNS = (
    "apple", "river", "stone", "lamp", "cloud", "horse", "table", "garden", "window", "bridge",
    "candle", "forest", "mirror", "pencil", "rabbit", "island", "ladder", "market", "bottle",
    "castle", "desert", "engine", "feather", "guitar", "hammer", "jacket", "kettle", "lemon",
    "meadow", "needle", "orange", "pepper", "pillow", "rocket", "saddle", "tunnel", "valley",
    "wagon", "basket", "button", "carpet", "dragon", "falcon", "glove", "harbor", "violin",
    "jungle", "kitten", "lizard", "mountain", "napkin", "ocean", "parrot", "puzzle", "ribbon",
    "silver", "tiger", "umbrella", "velvet", "walnut", "anchor", "banana", "cactus", "dolphin",
    "eagle", "fountain", "giraffe", "helmet", "iceberg", "jewel", "koala", "lantern", "magnet",
    "nest", "oyster", "piano", "quilt", "rose", "shadow", "tomato", "unicorn", "vase", "whale",
    "yacht", "zebra", "arrow", "beacon", "cottage", "drum", "ember", "fence", "goose", "honey",
    "ink", "jar", "kite", "leaf", "moon", "nut", "owl", "pearl", "queen", "rain", "sail", "tower",
    "wheel", "coin", "door", "flag", "grape", "hill", "key", "lake", "map", "nail", "pond", "ring",
    "salt", "tree", "wall", "bell", "cake", "dust", "farm", "gate",
)
_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def spell(n: int) -> str:
  """0 <= n < 10000 in English words, no hyphens, commas or "and": 342 -> "three hundred forty
  two", 7005 -> "seven thousand five"."""
  if not 0 <= n < 10000:
    raise ValueError(f"spell covers 0-9999, got {n}")
  words = []
  if n >= 1000:
    words += [_ONES[n // 1000], "thousand"]
    n %= 1000
    if n == 0:
      return " ".join(words)
  if n >= 100:
    words += [_ONES[n // 100], "hundred"]
    n %= 100
    if n == 0:
      return " ".join(words)
  if n < 20:
    words.append(_ONES[n])
  else:
    words.append(_TENS[n // 10])
    if n % 10:
      words.append(_ONES[n % 10])
  return " ".join(words)


def _number_words(rng: np.random.Generator) -> tuple[str, str]:
  n = int(rng.integers(0, 10000))
  return str(n), spell(n)


def _reverse_words(rng: np.random.Generator) -> tuple[str, str]:
  words = list(rng.choice(NOUNS, size=int(rng.integers(3, 6)), replace=False))
  return " ".join(words), " ".join(reversed(words))


def _key_value(rng: np.random.Generator) -> tuple[str, str]:
  keys = rng.choice(list(_LETTERS), size=int(rng.integers(3, 6)), replace=False)
  values = rng.integers(0, 10, size=len(keys))
  asked = int(rng.integers(0, len(keys)))
  pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
  return f"{pairs} ; {keys[asked]}", str(values[asked])


def _acronym(rng: np.random.Generator) -> tuple[str, str]:
  words = rng.choice(NOUNS, size=int(rng.integers(3, 5)), replace=False)
  return " ".join(w.capitalize() for w in words), "".join(w[0].upper() for w in words)


def _sort_numbers(rng: np.random.Generator) -> tuple[str, str]:
  numbers = [int(x) for x in rng.choice(np.arange(1, 100), size=4, replace=False)]
  return " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))


FAMILIES: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "number_words": _number_words,
    "reverse_words": _reverse_words,
    "key_value": _key_value,
    "acronym": _acronym,
    "sort_numbers": _sort_numbers,
}


INSTRUCTIONS = {
    "number_words": "Write the number in English words.",
    "reverse_words": "Write the words in reverse order.",
    "key_value": "Give the value of the key after the semicolon.",
    "acronym": "Write the first letter of each word.",
    "sort_numbers": "Sort the numbers from smallest to largest.",
}


def family_rows(family: str, rows: int | None = None) -> list[dict[str, str]]:
  """The family's rows as BIG-bench examples ({"input", "target"}), first occurrence of each
  input kept, from a generator seeded by the family's name; `rows` draws (default `ROWS`)."""
  if family not in FAMILIES:
    raise common.DataError(f"unknown synthetic family {family!r}; known: {sorted(FAMILIES)}")
  rng = np.random.default_rng(zlib.crc32(f"synthetic-v{VERSION}/{family}".encode()))
  seen: dict[str, str] = {}
  for _ in range(rows or ROWS):
    text, target = FAMILIES[family](rng)
    seen.setdefault(text, target)
  return [{"input": k, "target": v} for k, v in seen.items()]


def task_spec(family: str) -> dict:
  return {"name": family, "description": f"single_multi synthetic family {family} v{VERSION}",
          "keywords": ["synthetic"], "metrics": ["exact_str_match"],
          "preferred_score": "exact_str_match", "task_prefix": INSTRUCTIONS[family],
          "examples": family_rows(family)}


def write(root: pathlib.Path, families) -> pathlib.Path:
  """Writes each family's task.json under `root/benchmark_tasks/<family>/` (atomically, and only
  where the file differs from what the generator gives now, so an edited generator never leaves
  stale rows); returns that benchmark_tasks/ directory."""
  tasks_dir = pathlib.Path(root) / "benchmark_tasks"
  for family in families:
    path = tasks_dir / family / "task.json"
    text = json.dumps(task_spec(family), indent=1)
    if path.exists() and path.read_text(encoding="utf-8") == text:
      continue
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".task.json.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  return tasks_dir


def default_root() -> pathlib.Path:
  return assets.cache_root() / "synthetic" / f"v{VERSION}"
