"""grain pipelines: examples -> chat prompts (k-shot from the shot split only) -> token batches.

    batches = pipeline.generation_batches(examples, prompter, batch_size=16)
    for batch in batches.to_iter_dataset():   # a checkpointable grain iterator
      batch["tokens"], batch["mask"]           # [B, T] left-padded, T a power-of-two bucket
      batch["index"]                           # [B] position in `examples`; -1 on filler rows

Examples are ordered by prompt length (longest first, so the biggest shape compiles first and
memory peaks early) and cut into batches padded to power-of-two buckets: few compiled shapes, little
padding. Every batch has exactly `batch_size` rows (filler rows have index -1 and an all-zero
mask), and with `shard=(process_index, process_count)` each JAX process reads every
process_count-th batch, every process the same number of batches (the last ones may be filler).
Bad rows (`problem` set) never reach a batch; callers count and report them (see evaluate.py).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import grain
import numpy as np

from single_multi import decoding
from single_multi.data import common
from single_multi.data import metrics
from single_multi.data.metrics import LETTERS


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  k_shot: int = 0
  system: str = ""  # Optional system message.
  mc_instruction: str = "Answer with the letter of the correct option."
  gen_instruction: str = ""  # Appended to generative questions when set.
  chat_template: bool = True  # False: plain "Question: ...\nAnswer:" text.
  seed: int = 0  # Exemplar selection.
  # "default", or "moco": the MoCo toolkit's user turns exactly (data/eval.py at moco.COMMIT:
  # format_mcq_question; prepare_inputs' \box instruction); the instruction fields are unused.
  style: str = "default"


def _moco_question(ex: common.Example, with_options: bool) -> str:
  if ex.is_mc and with_options:
    options = "".join(f"{LETTERS[i]}) {c}\n" for i, c in enumerate(ex.choices))
    return f"{ex.question}\n{options}{metrics.MOCO_MC_INSTRUCTION}\n"
  if ex.is_mc:
    return ex.question
  return f"{ex.question.rstrip()}\n\n{metrics.MOCO_GEN_INSTRUCTION}"


def question_text(ex: common.Example, config: PromptConfig, with_options: bool = True) -> str:
  """The user turn: the question, then (MC) lettered options and the instruction."""
  if config.style == "moco":
    return _moco_question(ex, with_options)
  if config.style != "default":
    raise ValueError(f"unknown prompt style {config.style!r}; 'default' or 'moco'")
  parts = [ex.question.strip()]
  if ex.is_mc and with_options:
    parts.append("\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices)))
    if config.mc_instruction:
      parts.append(config.mc_instruction)
  elif not ex.is_mc and config.gen_instruction:
    parts.append(config.gen_instruction)
  return "\n".join(parts)


def answer_text(ex: common.Example, style: str = "default") -> str:
  """The assistant turn of an exemplar: what a correct generated answer looks like."""
  if style == "moco":
    return f"{LETTERS[ex.answer]}) {ex.choices[ex.answer]}" if ex.is_mc else \
        f"\\box{{{ex.targets[0]}}}"
  if ex.is_mc:
    return f"The answer is ({LETTERS[ex.answer]})."
  return ex.targets[0]


class Prompter:
  """Renders examples as token ids with the tokenizer's chat template.

  Exemplars come only from `shots` (the task's shot split, never the evaluated split): k valid rows
  of the same subject when there are k, else of any subject, never one with the same question
  text, picked by a hash of (seed, example id, exemplar id) so the choice is fixed per example.
  """

  def __init__(self, tokenizer, config: PromptConfig = PromptConfig(),
               shots: Sequence[common.Example] = ()):
    if config.k_shot and not [s for s in shots if not s.problem]:
      raise common.DataError(f"k_shot={config.k_shot} but the shot split has no valid example")
    if config.chat_template and not getattr(tokenizer, "chat_template", None):
      raise common.DataError(f"tokenizer {type(tokenizer).__name__} has no chat template; set "
                             "PromptConfig(chat_template=False) for plain prompts")
    self.tokenizer, self.config = tokenizer, config
    self.shots = [s for s in shots if not s.problem]
    self.by_subject: dict[str, list[common.Example]] = {}
    for s in self.shots:
      self.by_subject.setdefault(s.subject, []).append(s)

  def exemplars(self, ex: common.Example) -> list[common.Example]:
    k = self.config.k_shot
    if not k:
      return []
    same = self.by_subject.get(ex.subject, [])
    pool = same if len(same) >= k else self.shots
    key = common.normalize_question(ex.question)
    pool = [s for s in pool if common.normalize_question(s.question) != key]
    rank = lambda s: common.split_fraction(f"{ex.id}\x00{s.id}", self.config.seed)
    return sorted(pool, key=rank)[:k]

  def messages(self, ex: common.Example, with_options: bool = True) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": self.config.system}] if self.config.system else []
    for s in self.exemplars(ex):
      msgs += [{"role": "user", "content": question_text(s, self.config, with_options)},
               {"role": "assistant", "content": answer_text(s, self.config.style)
                if with_options or not s.is_mc
                else s.choices[s.answer]}]
    msgs.append({"role": "user", "content": question_text(ex, self.config, with_options)})
    return msgs

  def text(self, ex: common.Example, with_options: bool = True) -> str:
    msgs = self.messages(ex, with_options)
    if self.config.chat_template:
      return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    turns = [("Question: " if m["role"] == "user" else "Answer: " if m["role"] == "assistant"
              else "") + m["content"] for m in msgs]
    return "\n\n".join(turns) + "\nAnswer:"

  def ids(self, ex: common.Example, with_options: bool = True) -> list[int]:
    return self.tokenizer(self.text(ex, with_options), add_special_tokens=False)["input_ids"]

  def question_ids(self, ex: common.Example) -> list[int]:
    """The bare user turn (question, options, instruction) without template or exemplars: what
    text-level collaboration strategies place inside their own prompts."""
    return self.tokenizer(question_text(ex, self.config), add_special_tokens=False)["input_ids"]

  def choice_ids(self, ex: common.Example) -> list[list[int]]:
    """Token ids of each option as the assistant's reply (no leading space with a chat template,
    where the reply starts a new line; " option" after a plain "Answer:")."""
    sep = "" if self.config.chat_template else " "
    return [self.tokenizer(sep + c, add_special_tokens=False)["input_ids"] for c in ex.choices]


pad_id_of = decoding.pad_id_of


def _order(examples: Sequence[common.Example], batch_size: int, shard: tuple[int, int],
           length) -> list[list[int]]:
  """Indices of valid examples, longest first, cut into batches; this process's batches."""
  valid = [i for i, ex in enumerate(examples) if not ex.problem]
  valid.sort(key=lambda i: (-length(examples[i]), i))
  batches = [valid[i:i + batch_size] for i in range(0, len(valid), batch_size)]
  index, count = shard
  if not 0 <= index < count:
    raise ValueError(f"shard {index} of {count}")
  batches += [[]] * (-len(batches) % count)  # Every process gets the same number of batches.
  return batches[index::count]


def _left_pad_batch(rows: Sequence[list[int]], batch_size: int, pad_id: int, fine: bool = False):
  length = decoding.bucket_length(max((len(r) for r in rows), default=1), fine=fine)
  rows = list(rows) + [[]] * (batch_size - len(rows))
  return decoding.left_pad(rows, pad_id, length)


def shared_prefix(prompts: Sequence[Sequence[int]]) -> list[int]:
  """The longest token prefix every prompt starts with, leaving each at least one token of its
  own (the next token's logits come from a prompt's last position)."""
  if not prompts:
    return []
  head = os.path.commonprefix([list(p) for p in prompts])  # Element-wise: works on lists.
  return head[:max(min(map(len, prompts)) - 1, 0)]


def _generation_batch(indices: list[int], *, examples, prompter: Prompter, batch_size: int,
                      prefix: Sequence[int] = ()):
  pad = pad_id_of(prompter.tokenizer)
  ids = [prompter.ids(examples[i]) for i in indices]
  tokens, mask = _left_pad_batch(ids, batch_size, pad)
  question, question_mask = _left_pad_batch([prompter.question_ids(examples[i]) for i in indices],
                                            batch_size, pad)
  index = np.full((batch_size,), -1, np.int32)
  index[:len(indices)] = indices
  batch = {"tokens": tokens, "mask": mask, "question": question, "question_mask": question_mask,
           "index": index}
  if prefix:
    batch["prefix"] = np.asarray(prefix, np.int32)
    batch["rest"], batch["rest_mask"] = _left_pad_batch([r[len(prefix):] for r in ids],
                                                        batch_size, pad)
  return batch


def generation_batches(examples: Sequence[common.Example], prompter: Prompter, *, batch_size: int,
                       shard: tuple[int, int] = (0, 1),
                       split_prefix: bool = False) -> grain.MapDataset:
  """Prompt batches for generation: tokens/mask [B, T] (left-padded), the bare questions
  question/question_mask [B, Q] (left-padded), index [B] (-1: filler row).

  split_prefix: also the head every valid prompt of `examples` starts with (`shared_prefix`; the
  same for every batch and process), prefix [Pp], and each prompt's rest, rest/rest_mask [B, R]
  (left-padded), for a decode that prefills the head once (`pool.decode_each(prefix_p=)`); no
  such keys when the prompts share no head."""
  order = _order(examples, batch_size, shard, lambda ex: len(ex.question) + sum(map(len, ex.choices)))
  prefix = (shared_prefix([prompter.ids(ex) for ex in examples if not ex.problem])
            if split_prefix else [])
  return grain.MapDataset.source(order).map(functools.partial(
      _generation_batch, examples=examples, prompter=prompter, batch_size=batch_size,
      prefix=tuple(prefix)))


def _loglik_batch(indices: list[int], *, examples, prompter: Prompter, batch_size: int):
  pad = pad_id_of(prompter.tokenizer)
  prompts = [prompter.ids(examples[i], with_options=False) for i in indices]
  tokens, mask = _left_pad_batch(prompts, batch_size, pad, fine=True)
  rows = [(b, c, ids) for b, i in enumerate(indices)
          for c, ids in enumerate(prompter.choice_ids(examples[i]))]
  num_rows = decoding.bucket_length(len(rows), minimum=batch_size, fine=True)
  length = decoding.bucket_length(max((len(r[2]) for r in rows), default=1), minimum=4)
  choices = np.full((num_rows, length), pad, np.int32)
  choice_mask = np.zeros((num_rows, length), np.int32)
  owner = np.zeros((num_rows,), np.int32)
  slot = np.full((num_rows,), -1, np.int32)
  for r, (b, c, ids) in enumerate(rows):
    choices[r, :len(ids)] = ids  # Right-padded: the reply starts right after the prompt.
    choice_mask[r, :len(ids)] = 1
    owner[r], slot[r] = b, c
  index = np.full((batch_size,), -1, np.int32)
  index[:len(indices)] = indices
  return {"tokens": tokens, "mask": mask, "choices": choices, "choice_mask": choice_mask,
          "owner": owner, "slot": slot, "index": index}


def loglik_batches(examples: Sequence[common.Example], prompter: Prompter, *, batch_size: int,
                   shard: tuple[int, int] = (0, 1)) -> grain.MapDataset:
  """Batches for multiple-choice log-likelihood scoring: the prompt once per example
  (tokens/mask [B, T], left-padded) and the options of all its examples as one flat set of reply
  rows (choices/choice_mask [R, L], right-padded), so no compute goes to options an example does
  not have: row r is option slot[r] of batch row owner[r]; filler rows have slot -1 and no mask.
  T and R are bucketed at powers of two and the 1.5x steps between them."""
  mc = [ex for ex in examples if ex.is_mc or ex.problem]
  if len(mc) != len(examples):
    raise common.DataError("log-likelihood scoring needs multiple-choice examples; "
                           f"{len(examples) - len(mc)} are generative")
  order = _order(examples, batch_size, shard, lambda ex: len(ex.question))
  return grain.MapDataset.source(order).map(functools.partial(
      _loglik_batch, examples=examples, prompter=prompter, batch_size=batch_size))


def prefetch(dataset: grain.MapDataset, threads: int = 2) -> Any:
  """A checkpointable iterator that prepares the next batches on background threads."""
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                        prefetch_buffer_size=2 * threads)))


def sft_rows(prompter: Prompter, examples: Sequence[common.Example], answers: Sequence[str],
             eos_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Training rows: each example's prompt exactly as at generation (`Prompter.ids`), then its
  answer's tokens and eos; left-padded to a length bucket. Returns tokens, mask and loss_mask
  (1 on the answer and eos: what the model learns to write)."""
  rows, lengths = [], []
  for ex, answer in zip(examples, answers, strict=True):
    ids = prompter.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos_id]
    rows.append(prompter.ids(ex) + ids)
    lengths.append(len(ids))
  if not rows:
    raise common.DataError("no training rows")
  tokens, mask = decoding.left_pad(rows, pad_id_of(prompter.tokenizer),
                                   decoding.bucket_length(max(map(len, rows)), fine=True))
  loss_mask = np.zeros_like(mask)
  for i, n in enumerate(lengths):
    loss_mask[i, -n:] = 1
  return tokens, mask, loss_mask


def gold_answer(ex: common.Example) -> str:
  """The reference answer as text: the correct option, or the first target."""
  return ex.choices[ex.answer] if ex.is_mc else ex.targets[0]
