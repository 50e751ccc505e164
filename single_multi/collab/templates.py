"""Token-space prompt templates for text-level strategies, and `make_env`.

A template is a chat (rendered with the pool tokenizer's chat template, generation prompt added)
with slots: `{question}` and `{answer}`. It is split at the slots and each fixed piece tokenized
once on the host; inside the jitted strategy the pieces are interleaved with the question's and the
answers' tokens (`core.pack`). Slots: every template starts with the question, then its answers.
"""

from __future__ import annotations

from typing import Any, Callable

from single_multi import decoding
from single_multi.collab import core

_SLOT = "\x00SLOT\x00"


def _answers(labels: list[str]) -> str:
  return "\n\n".join(f"{label}: {_SLOT}" for label in labels)


_TEAM = ("You are part of a team of AI assistants collaborating to answer the user's question. "
         "Each assistant provides their own answer: use their answers to ")


def _bullets(k: int) -> str:
  return "".join(f"- {_SLOT}\n" for _ in range(k))


# name -> builder(n_models, cfg) -> user message with slots: the question first, then the answers
# in the order the strategy passes them (`ANSWER_ORDER`).
_BUILDERS: dict[str, Callable[[int, Any], str]] = {
    # GitHub BunsenFeng/model_collaboration, model_collaboration/method/text_multiagent_refine.py:
    # the refine prompt (own previous answer, then the others' in index order) and the summary.
    "refine": lambda n, cfg: (
        _TEAM + "refine and improve your own answer.\n\n"
        f"Question: {_SLOT}\n\nYour previous answer: {_SLOT}\n\n"
        "Other assistants' answers:\n" + _bullets(n - 1)
        + "\nPlease provide a refined answer to the question."),
    "summarize": lambda n, cfg: (
        _TEAM + "create a final, comprehensive answer.\n\n"
        f"Question: {_SLOT}\n\nAssistants' answers:\n" + _bullets(n)
        + "\nPlease provide a final, comprehensive answer to the question."),
    # .../method/text_multiagent_finetuning.py, _build_critic_prompt_with_summary: the others'
    # answers joined by blank lines (_summarize_other_answers), then the critic's own.
    "critic": lambda n, cfg: (
        f"Question: {_SLOT}\nSummary of other assistants' answers:\n"
        + "\n\n".join([_SLOT] * (n - 1))
        + f"\nYour previous answer: {_SLOT}\nPlease provide a refined and correct answer to the "
          "question."),
    # .../method/api_trained_router.py (no model descriptions): the LM router's prompt.
    "router": lambda n, cfg: (
        "You are an AI assistant tasked with choosing the best model to answer the user's "
        f"question.\n\nQuestion: {_SLOT}\n\nBased on your knowledge, choose the best model "
        f"(1-{n}) to answer the question."),
    "fuse": lambda n, cfg: (
        f"{_SLOT}\n\nHere are the best candidate answers, best first:\n\n"
        + _answers([f"Candidate {k + 1}" for k in range(min(cfg.top_k, n))])
        + "\n\nFuse them into one answer that keeps their strengths and fixes their mistakes."),
    "compare": lambda n, cfg: (
        f"{_SLOT}\n\nAnswer A: {_SLOT}\n\nAnswer B: {_SLOT}\n\n"
        "Which answer is better? Reply with A or B only."),
    "aggregate": lambda n, cfg: (
        "You have been given responses from several models to the query below. Synthesize them "
        "into a single, accurate, high-quality response; critically evaluate them, as some may be "
        f"wrong.\n\nQuery: {_SLOT}\n\n" + _answers([f"Response {k + 1}" for k in range(n)])),
}


# How each template orders the answers after the question, for model i of n: "own_first" (its own
# previous answer, then the others' in index order), "own_last" (the others', then its own),
# "all" (every model's, in index order). Templates not listed take "all".
ANSWER_ORDER = {"refine": "own_first", "critic": "own_last"}


def order_answers(template: str, answers, i: int) -> list:
  """The answers of the n models as `template`'s slots take them, for model i."""
  others = [a for j, a in enumerate(answers) if j != i]
  order = ANSWER_ORDER.get(template, "all")
  if order == "own_first":
    return [answers[i], *others]
  if order == "own_last":
    return [*others, answers[i]]
  return list(answers)


def render(tokenizer, user: str) -> tuple[tuple[int, ...], ...]:
  """The chat-rendered user message split at its slots; each piece tokenized."""
  if getattr(tokenizer, "chat_template", None):
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                         add_generation_prompt=True, tokenize=False)
  else:
    text = "Question: " + user + "\n\nAnswer:"
  return tuple(tuple(tokenizer(p, add_special_tokens=False)["input_ids"])
               for p in text.split(_SLOT))


def make_env(pool, strategy: str, cfg: Any = None, *, max_new_tokens: int = 64,
             sampler: Any = decoding.Greedy(), return_rows: bool = False) -> core.Env:
  """The static Env of `strategy` for `pool` (a `pool.Pool`): its templates, stop and pad ids."""
  spec = core.get(strategy)
  cfg = spec.Config() if cfg is None else cfg
  if not isinstance(cfg, spec.Config):
    raise core.StrategyError(f"{strategy} takes a {spec.Config.__name__}, got "
                             f"{type(cfg).__name__}")
  if pool.size < spec.min_models:
    raise core.StrategyError(f"{strategy} needs at least {spec.min_models} models; the pool has "
                             f"{pool.size}")
  templates = []
  for name in spec.templates:
    if pool.tokenizer is None:
      raise core.StrategyError(f"{strategy} builds prompts from text templates; the pool has no "
                               "tokenizer")
    templates.append((name, render(pool.tokenizer, _BUILDERS[name](pool.size, cfg))))
  if "compare" in spec.templates:  # The ranker's verdict tokens.
    labels = tuple(tuple(pool.tokenizer(x, add_special_tokens=False)["input_ids"][:1])
                   for x in ("A", "B"))
    templates.append(("labels", labels))
  tok = pool.tokenizer
  pad_id = decoding.pad_id_of(tok)
  return core.Env(config=pool.config, max_new_tokens=max_new_tokens,
                  stop_ids=decoding.stop_ids_for(pool.config, tok), pad_id=pad_id,
                  sampler=sampler, templates=tuple(templates), names=pool.names,
                  return_rows=return_rows)
