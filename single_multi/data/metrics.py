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


# -------------------------------------------------------------------------------------------------
# The MoCo toolkit's rules (GitHub BunsenFeng/model_collaboration, model_collaboration/data/eval.py
# at ecea545: parse_model_response_mcq, extract_answer_text, calculate_exact_match,
# calculate_f1_score, the popqa branch of get_scores), for the paper's task files (data/moco.py).

MOCO_MC_INSTRUCTION = ("Please select the correct answer by choosing the letter corresponding to "
                       "your choice.")
MOCO_GEN_INSTRUCTION = "Please provide the final, direct answer wrapped exactly as \\box{ANSWER}"


def moco_choice(text: str, choices: Sequence[str]) -> int | None:
  """The reference's three-pass multiple-choice parse (case-insensitive), options lettered by
  position: (1) the reply is a letter, or starts with "a)", "a." or "a "; (2) else the first
  option (in order) whose text appears in the reply; (3) else the first letter for which "a)",
  "(a)", "answer is a" or "a." appears anywhere. None: no pick (scored 0).

  Faithful, quirks included: pass 3 tries letters in order, so "(B)" after a word ending in "a."
  picks A, and pass 2 runs before it, so an option text inside the reasoning wins over a letter.
  """
  reply = text.lower().strip()
  letters = [LETTERS[i].lower() for i in range(len(choices))]
  for i, a in enumerate(letters):
    if reply == a or reply.startswith((f"{a})", f"{a}.", f"{a} ")):
      return i
  for i, option in enumerate(choices):
    if option.lower() in reply:
      return i
  for i, a in enumerate(letters):
    if f"{a})" in reply or f"({a})" in reply or f"answer is {a}" in reply or f"{a}." in reply:
      return i
  return None


_MOCO_FALLBACKS = [
    r"Final Answer:\s*((?:[^<]|<[^<])*?)\n",
    r"Final Answer is:\s*((?:[^<]|<[^<])*?)\n",
    r"The answer is:\s*((?:[^<]|<[^<])*?)\n",
    r"Answer:\s*((?:[^<]|<[^<])*?)\n",
    r"Solution:\s*((?:[^<]|<[^<])*?)\n",
    r"The solution is:\s*((?:[^<]|<[^<])*?)\n",
    r"\bthe answer\s*(?:is|=)?\s*[:\-]?\s*(.+)",
    r"\bfinal answer\s*(?:is|=)?\s*[:\-]?\s*(.+)",
    r"\banswer\s*(?:is|=)?\s*[:\-]?\s*(.+)",
]


def _boxes(text: str) -> list[str]:
  """Contents of every \\box{...} / \\boxed{...}, braces balanced (an unclosed box runs to the
  end of the text)."""
  found = []
  for match in re.finditer(r"\\box(?:ed)?\s*\{", text, flags=re.IGNORECASE):
    depth, start = 1, match.end()
    for j in range(start, len(text)):
      depth += {"{": 1, "}": -1}.get(text[j], 0)
      if depth == 0:
        found.append(text[start:j])
        break
  return found


def moco_answer(text: str) -> str:
  """The answer in a free-form reply, by the reference's rules: the last \\box{...} or
  \\boxed{...}; else the rest of the line after "\\box "; else the first of the reference's
  phrases ("Final Answer:", ..., "the answer is", "final answer", "answer") that is followed by
  text, cut at the line's end with trailing ". " stripped; else the whole reply, stripped.

  One deliberate deviation: braces inside a box are balanced, so "\\boxed{\\frac{1}{2}}" gives
  "\\frac{1}{2}" (the reference's non-greedy pattern stops at the first "}": "\\frac{1").
  """
  boxes = _boxes(text)
  if boxes:
    return boxes[-1].strip()
  inline = re.search(r"\\box(?:ed)?\s+([^\n\r]*)", text, flags=re.IGNORECASE)
  if inline and inline.group(1).strip():
    return inline.group(1).strip()
  for pattern in _MOCO_FALLBACKS:
    match = re.search(pattern, text, flags=re.IGNORECASE)
    if match and match.group(1).strip():
      candidate = re.split(r"[\n\r]", match.group(1).strip(), maxsplit=1)[0].strip().rstrip(". ")
      if candidate:
        return candidate
  return text.strip()


def alias_list(encoded: str) -> list[str]:
  """popqa's gold aliases, stored as a list written as a string ('["A B", "C"]'). The reference
  strips brackets and quotes and splits at commas; a JSON (or Python) list is parsed as such, so
  an alias containing a comma stays whole (the one deviation); anything else falls back to the
  reference's split."""
  import ast
  import json as json_lib
  for parse in (json_lib.loads, ast.literal_eval):
    try:
      value = parse(encoded)
    except (ValueError, SyntaxError):
      continue
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
      return [v.strip() for v in value]
    if isinstance(value, str):
      return [value.strip()]
  stripped = re.sub(r"[\[\]\"']", "", encoded)
  return [a.strip() for a in stripped.split(",")]
