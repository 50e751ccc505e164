"""Task metrics: multiple-choice (by generation or by log-likelihood), exact match, token F1, numbers.

Pure Python on host strings/arrays; every function scores one example so callers can keep
per-example records and aggregate (with confidence intervals) separately.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

LETTERS = string.ascii_uppercase


# -------------------------------------------------------------------------------------------------
# Multiple choice by generation.

# Ordered from most to least explicit; the first pattern that yields a valid letter wins.
_LETTER_PATTERNS = [
    r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\**\s*([A-Z])\s*\**\)?(?![A-Za-z])",
    r"^\s*\(?\**([A-Z])\**\s*[\).:](?:\s|$)",
    r"\(([A-Z])\)",
    r"^\s*\**([A-Z])\**\s*$",
    r"(?<![A-Za-z])([A-Z])[\).](?:\s|$)",
]


def extract_choice(text: str, choices: Sequence[str]) -> int | None:
  """Index of the option a generated answer picks: a letter ("The answer is (B).", "B) ...",
  "Answer: C") or else the text of exactly one option; None when it picks none."""
  n = len(choices)
  for pattern in _LETTER_PATTERNS:
    for match in re.finditer(pattern, text, flags=re.IGNORECASE | re.MULTILINE):
      letter = match.group(1).upper()
      if letter in LETTERS[:n] and (match.group(1).isupper() or "answer" in pattern):
        return LETTERS.index(letter)
  norm = normalize_answer(text)
  hits = [i for i, c in enumerate(choices) if normalize_answer(c) and
          re.search(rf"(?<!\w){re.escape(normalize_answer(c))}(?!\w)", norm)]
  return hits[0] if len(hits) == 1 else None


def mc_generation_score(text: str, choices: Sequence[str], answer: int) -> float:
  return float(extract_choice(text, choices) == answer)


# -------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood.


def mc_loglik_predictions(choice_logprobs: Sequence[float], choice_lengths: Sequence[int]
                          ) -> tuple[int, int]:
  """(raw argmax, length-normalised argmax) over the summed log-probs of each option's tokens."""
  lp = np.asarray(choice_logprobs, np.float64)
  lengths = np.asarray(choice_lengths, np.float64)
  if lp.shape != lengths.shape or lp.size == 0:
    raise ValueError(f"need one log-prob and one length per option, got {lp.shape} and "
                     f"{lengths.shape}")
  if np.any(lengths <= 0):
    raise ValueError(f"option lengths must be positive, got {list(choice_lengths)}")
  return int(np.argmax(lp)), int(np.argmax(lp / lengths))


# -------------------------------------------------------------------------------------------------
# Free-form answers.


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, targets: Sequence[str]) -> float:
  """1 if the normalised prediction equals any normalised alias."""
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(t) for t in targets))


def token_f1(prediction: str, targets: Sequence[str]) -> float:
  """SQuAD token F1, maximised over aliases."""
  pred = normalize_answer(prediction).split()
  best = 0.0
  for target in targets:
    gold = normalize_answer(target).split()
    if not pred or not gold:
      best = max(best, float(pred == gold))
      continue
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common:
      precision, recall = common / len(pred), common / len(gold)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


# -------------------------------------------------------------------------------------------------
# Numbers (GSM8K style).

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"


def extract_number(text: str) -> float | None:
  """The final numeric answer: after '####' when present (GSM8K), else after 'answer is', else
  the last number in the text. Commas, currency signs and trailing units are ignored."""
  for marker in (r"####\s*(" + _NUMBER + ")", r"answer\s*(?:is|:)\s*(" + _NUMBER + ")"):
    found = re.findall(marker, text, flags=re.IGNORECASE)
    if found:
      return _to_float(found[-1])
  found = re.findall(_NUMBER, text)
  return _to_float(found[-1]) if found else None


def _to_float(raw: str) -> float | None:
  cleaned = raw.replace(",", "").replace("$", "").replace(" ", "")
  try:
    return float(cleaned)
  except ValueError:
    return None


def numeric_match(prediction: str, target: str | float, rel_tol: float = 1e-6) -> float:
  """1 if the prediction's final number equals the target's (relative tolerance 1e-6)."""
  pred = extract_number(prediction)
  gold = target if isinstance(target, (int, float)) else extract_number(target)
  if pred is None or gold is None:
    return 0.0
  return float(abs(pred - gold) <= rel_tol * max(1.0, abs(gold)))
