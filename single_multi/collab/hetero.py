"""Heterogeneous pools (different tokenizers or architectures): text- and API-level strategies
exchange text on the host.

Each model reads prompts rendered with its own chat template and answers with its own jitted
decode; answers are detokenised and placed in the next stage's prompts with the same templates as
the token-space versions (`templates._BUILDERS`). Logit-, token- and weight-level strategies need
one vocabulary and one architecture: `run_heterogeneous` refuses them with the reason.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from single_multi import decoding
from single_multi.collab import core, routers, templates, text_level
from single_multi.data import common, metrics, pipeline
from single_multi.models import transformer
from single_multi.models.loading import Model

HOST_STRATEGIES = ("single", "multiagent_refine", "mixture_of_agents", "llm_blender",
                   "multiagent_finetuning", "trained_router", "graph_router")


def fill_text(template: str, values: Sequence[str]) -> str:
  parts = template.split(templates._SLOT)
  if len(parts) != len(values) + 1:
    raise core.StrategyError(f"template has {len(parts) - 1} slots, {len(values)} values given")
  return "".join(p + v for p, v in zip(parts, values)) + parts[-1]


def _generate(model: Model, chats: list[list[dict[str, str]]], max_new_tokens, sampler, seed,
              batch_size=None, progress=False):
  """Replies in batches of `batch_size` (None: one batch); batch k samples with seed + k."""
  size = batch_size or max(len(chats), 1)
  starts = tqdm.trange(0, len(chats), size, desc=f"{model.source} (text exchange)", unit="batch",
                       disable=not progress, leave=False)
  return [t.strip() for k in starts
          for t in decoding.generate(model, chats[k:k + size], max_new_tokens=max_new_tokens,
                                     sampler=sampler, seed=seed + k // size)]


def _user(text: str) -> list[dict[str, str]]:
  return [{"role": "user", "content": text}]


def run_heterogeneous(models: Sequence[Model], name: str, examples: Sequence[common.Example], *,
                      cfg: Any = None, state: Any = None,
                      prompt: pipeline.PromptConfig = pipeline.PromptConfig(),
                      shots: Sequence[common.Example] = (), max_new_tokens: int = 64,
                      sampler: Any = decoding.Greedy(), seed: int = 0,
                      answer_key=None, batch_size: int | None = None,
                      progress: bool = False) -> list[dict[str, Any]]:
  """Per example {"output": final text, "answers": [[text per model] per round], ...}.
  answer_key(example, text): the answer a vote counts (`evaluate.answer_key` for a task's
  metric); None: the normalised text. batch_size: rows per decode (None: all at once)."""
  spec = core.get(name)
  if name not in HOST_STRATEGIES:
    raise core.StrategyError(
        f"{name} is a {spec.level}-level strategy: it combines the models' {spec.level}s, which "
        f"needs one vocabulary and one architecture. On a heterogeneous pool use one of "
        f"{list(HOST_STRATEGIES)}")
  if len(models) < spec.min_models:
    raise core.StrategyError(f"{name} needs at least {spec.min_models} models, got {len(models)}")
  cfg = spec.Config() if cfg is None else cfg
  n = len(models)
  kw = dict(max_new_tokens=max_new_tokens, sampler=sampler, seed=seed, batch_size=batch_size,
            progress=progress)
  questions = [pipeline.question_text(ex, prompt) for ex in examples]
  prompters = [pipeline.Prompter(m.tokenizer, prompt, shots) for m in models]

  def first_answers(which=range(n)):
    return {i: _generate(models[i], [prompters[i].messages(ex) for ex in examples], **kw)
            for i in which}

  if name == "single":
    return [{"output": a, "answers": [[a]]} for a in first_answers([cfg.model])[cfg.model]]

  if name in ("trained_router", "graph_router"):
    return _route(models, name, examples, prompters, cfg, state, kw)

  answers = first_answers()
  history = [answers]
  if name in ("multiagent_refine", "multiagent_finetuning", "mixture_of_agents"):
    rounds = {"multiagent_refine": getattr(cfg, "rounds", 0),
              "multiagent_finetuning": getattr(cfg, "rounds", 0),
              "mixture_of_agents": getattr(cfg, "layers", 1) - 1}[name]
    template = {"mixture_of_agents": "aggregate", "multiagent_refine": "refine",
                "multiagent_finetuning": "critic"}[name]
    text = templates._BUILDERS[template](n, cfg)
    for _ in range(rounds):
      answers = {i: _generate(models[i], [
          _user(fill_text(text, [q] + templates.order_answers(
              template, [answers[j][b] for j in range(n)], i)))
          for b, q in enumerate(questions)], **kw) for i in range(n)}
      history.append(answers)

  def per_example(b):
    return [[h[i][b] for i in range(n)] for h in history]

  if name == "multiagent_finetuning":  # The vote on extracted answers, as `evaluate` votes.
    key = answer_key or (lambda ex, text: metrics.normalize_answer(text))
    keys = [[key(ex, answers[i][b]) for i in range(n)] for b, ex in enumerate(examples)]
    winners = spec.select(keys, cfg, state)
    return [{"output": answers[w][b], "answers": per_example(b), "winner": w}
            for b, w in enumerate(winners)]

  if name in ("multiagent_refine", "mixture_of_agents"):
    chosen = getattr(cfg, "summarizer", None) if name == "multiagent_refine" else cfg.aggregator
    chosen = int(chosen if chosen is not None else (state or {}).get("best", 0))
    text = templates._BUILDERS["summarize" if name == "multiagent_refine" else "aggregate"](n, cfg)
    finals = _generate(models[chosen], [
        _user(fill_text(text, [q] + [answers[i][b] for i in range(n)]))
        for b, q in enumerate(questions)], **kw)
    return [{"output": f, "answers": per_example(b)} for b, f in enumerate(finals)]

  # llm_blender: the ranker compares every ordered pair by log p("A") - log p("B").
  ranker = models[cfg.ranker]
  compare = templates._BUILDERS["compare"](n, cfg)
  a_id, b_id = (ranker.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "AB")
  pref = np.zeros((n, n, len(examples)), np.float32)
  for i in range(n):
    for j in range(n):
      if i != j:
        chats = [_user(fill_text(compare, [q, answers[i][b], answers[j][b]]))
                 for b, q in enumerate(questions)]
        size = batch_size or len(chats)
        lp = np.concatenate([_last_logprobs(ranker, chats[k:k + size])
                             for k in range(0, len(chats), size)])
        pref[i, j] = lp[:, a_id] - lp[:, b_id]
  order, _ = text_level.rank_candidates(jnp.asarray(pref))
  order = np.asarray(order)
  k = min(cfg.top_k, n)
  fuse = templates._BUILDERS["fuse"](n, cfg)
  finals = _generate(models[cfg.fuser], [
      _user(fill_text(fuse, [q] + [answers[int(order[b, r])][b] for r in range(k)]))
      for b, q in enumerate(questions)], **kw)
  return [{"output": f, "answers": per_example(b), "ranking": order[b].tolist()}
          for b, f in enumerate(finals)]


def _last_logprobs(model: Model, chats) -> np.ndarray:
  ids = [decoding.encode_chat(model.tokenizer, c) for c in chats]
  tokens, mask = decoding.left_pad(ids, pipeline.pad_id_of(model.tokenizer))
  hidden, _ = transformer.hidden_states(model.params, jnp.asarray(tokens), model.config,
                                        mask_bt=jnp.asarray(mask))
  return np.asarray(jax.nn.log_softmax(transformer.lm_head(model.params, hidden[:, -1:],
                                                           model.config)[:, 0]))


def _route(models, name, examples, prompters, cfg, state, kw):
  """Route with the router member's features; each model answers only the rows routed to it."""
  if state is None:
    raise core.StrategyError(f"{name} must be fitted on dev first (collab.fit with the router "
                             "member's tokenization)")
  if name == "trained_router" and cfg.kind != "head":
    raise core.StrategyError("on a heterogeneous pool trained_router runs as kind='head' (the "
                             "LM router is fitted on a stacked pool)")
  router = models[cfg.router]
  ids = [prompters[cfg.router].ids(ex) for ex in examples]
  tokens, mask = decoding.left_pad(ids, pipeline.pad_id_of(router.tokenizer))
  feats = routers.query_features(router.params, jnp.asarray(tokens), jnp.asarray(mask),
                                 config=router.config)
  choice = np.asarray(routers.route_choice(name, state, cfg, feats))
  outputs: list[str] = [""] * len(examples)
  for i in sorted(set(choice.tolist())):
    rows = [b for b in range(len(examples)) if choice[b] == i]
    texts = _generate(models[i], [prompters[i].messages(examples[b]) for b in rows], **kw)
    for b, t in zip(rows, texts):
      outputs[b] = t
  return [{"output": o, "choice": int(c)} for o, c in zip(outputs, choice)]
