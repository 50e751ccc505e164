"""Text-level strategies in token space: models read each other's answers inside one program.

Every stage is a pool decode; the prompts of the next stage are packed from template pieces, the
question's tokens and the previous answers' tokens (`core.pack`), so a whole strategy is one
`jax.jit` program. Answers enter the next prompt without their stop token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from single_multi import decoding, pool as pool_lib
from single_multi.collab import core, templates
from single_multi.models import transformer


def _question(batch: core.Batch) -> core.Segment:
  return core.right_align(batch.question, batch.question_mask)


def _answers(out: decoding.DecodeOutput, env: core.Env) -> list[core.Segment]:
  """Per-model answer segments from a pool decode (tokens [N, B, M])."""
  lengths = core.answer_lengths(out.tokens, out.lengths, env.stop_ids)
  return [(out.tokens[i], lengths[i]) for i in range(out.tokens.shape[0])]


def fill(env: core.Env, template: str, question: core.Segment,
         answers: list[core.Segment], *, head: bool = True) -> tuple[jax.Array, jax.Array]:
  """Pack a template: piece, question, piece, answer 1, piece, ..., piece -> tokens, mask.
  head=False leaves out the first piece (the chat template's head and the template's text up to
  the question: the same in every row), for a decode that prefills it once (`answer_all`)."""
  pieces = env.template(template)
  if len(pieces) != len(answers) + 2:
    raise core.StrategyError(f"template {template!r} has {len(pieces) - 2} answer slots, "
                             f"{len(answers)} answers given")
  B = question[0].shape[0]
  segments = [core.piece(pieces[0], B), question]
  for piece, answer in zip(pieces[1:], answers):
    segments += [core.piece(piece, B), answer]
  segments.append(core.piece(pieces[-1], B))
  length = sum(len(p) for p in pieces) + sum(s[0].shape[1] for s in [question, *answers])
  if not head:
    segments, length = segments[1:], length - len(pieces[0])
  return core.pack(segments, length, env.pad_id)


def _decode_one(params_n, index, tokens, mask, rng, env: core.Env) -> decoding.DecodeOutput:
  return decoding.decode(core.member(params_n, index), tokens, mask, rng, sampler=env.sampler,
                         **env.decode_kw)


def _answer_all(params_n, tokens, mask, rng, env: core.Env,
                prefix_p=None) -> decoding.DecodeOutput:
  return pool_lib.decode_each(params_n, tokens, mask, rng, sampler=env.sampler,
                              prefix_p=prefix_p, **env.decode_kw)


def answer_all(params_n, template: str, question: core.Segment, answers_n, rng, env: core.Env):
  """Model i answers `template` filled with answers_n[i] (its own order of the answers). The
  template's first piece, the same in every row and model, is prefilled once per model and its
  cache shared by the rows (`pool.decode_each(prefix_p=)`; a refine prompt's chat head and
  instruction are 64 tokens with SmolLM2's template: 1.35x, benchmarks/shared_head.py). The rows
  see exactly the keys and positions of the whole prompts. Returns the decode and the whole
  prompts (tokens, mask) [N, B, P]."""
  whole = [fill(env, template, question, a) for a in answers_n]
  first = env.template(template)[0]
  if first and env.prefill_heads:
    rest = [fill(env, template, question, a, head=False) for a in answers_n]
    head = jnp.asarray(first, jnp.int32)
  else:  # Nothing shared, or switched off: the whole prompts.
    rest, head = whole, None
  out = _answer_all(params_n, jnp.stack([r[0] for r in rest]), jnp.stack([r[1] for r in rest]),
                    rng, env, prefix_p=head)
  return out, (jnp.stack([w[0] for w in whole]), jnp.stack([w[1] for w in whole]))


def _exchange_rounds(params_n, batch, rng, env, rounds: int, template: str):
  """All models answer; then `rounds` times each model answers again from `template` filled with
  the previous answers in its order (`templates.order_answers`, `answer_all`). Returns the last
  answers, every round's, the last prompts."""
  n = pool_lib.num_models(params_n)
  question = _question(batch)
  rng, key = decoding.split_keys(rng)
  out = _answer_all(params_n, batch.prompt, batch.prompt_mask, key, env)
  history, prompts = [out.tokens], None
  for _ in range(rounds):
    answers = _answers(out, env)
    rng, key = decoding.split_keys(rng)
    out, prompts = answer_all(params_n, template, question,
                              [templates.order_answers(template, answers, i) for i in range(n)],
                              key, env)
    history.append(out.tokens)
  return out, jnp.stack(history), prompts


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Multi-agent refinement (GitHub BunsenFeng/model_collaboration,
  model_collaboration/method/text_multiagent_refine.py): `rounds` refinement rounds after the
  first answers (the reference's `round` = 3 generations: 2 refinements). summarizer: the pool
  member that writes the final answer; None = the best single model on dev (`fit`), member 0
  before fitting."""

  rounds: int = 2
  summarizer: int | None = None


def _best_on_dev(pool, dev, cfg, env, rng):
  """State {"best": index of the best model on dev} from dev scores [N, Q] (a `DevData`)."""
  del pool, cfg, env, rng
  return {"best": jnp.asarray(int(jnp.argmax(jnp.mean(jnp.asarray(dev.scores), axis=1))))}


def _chosen(cfg_index, state, key="best"):
  if cfg_index is not None:
    return cfg_index
  return 0 if state is None else state[key]


@core.register("multiagent_refine", "text", RefineConfig, fit=_best_on_dev, min_models=2,
               templates=("refine", "summarize"))
def multiagent_refine(params_n, batch: core.Batch, rng, *, cfg: RefineConfig, env: core.Env,
                      state=None):
  """All answer; for k rounds each model reads its own previous answer and the others' and
  refines it; the summarizer (best on dev) writes the final answer from everyone's last
  answers. Prompts: the reference's text, word for word (templates.py)."""
  out, history, prompts = _exchange_rounds(params_n, batch, rng, env, cfg.rounds, "refine")
  tokens, mask = fill(env, "summarize", _question(batch), _answers(out, env))
  final = _decode_one(params_n, _chosen(cfg.summarizer, state), tokens, mask,
                      decoding.fold_keys(rng, 1), env)
  extras = {"answers": history, "summary_prompt": tokens}
  if prompts is not None:
    extras["refine_prompts"] = prompts[0]
  return core.Output(final.tokens, final.lengths, None, extras)


@dataclasses.dataclass(frozen=True)
class MixtureOfAgentsConfig:
  """Mixture-of-Agents (Wang et al. 2024): `layers` proposer layers (every pool member in each,
  reading all of the previous layer's answers from layer 2 on), then the aggregator."""

  layers: int = 2
  aggregator: int | None = None  # None: best on dev (`fit`), member 0 before fitting.


@core.register("mixture_of_agents", "text", MixtureOfAgentsConfig, fit=_best_on_dev,
               min_models=2, templates=("aggregate",))
def mixture_of_agents(params_n, batch: core.Batch, rng, *, cfg: MixtureOfAgentsConfig,
                      env: core.Env, state=None):
  """Layers of proposers that synthesise all previous answers; an aggregator answers last."""
  out, history, _ = _exchange_rounds(params_n, batch, rng, env, cfg.layers - 1, "aggregate")
  tokens, mask = fill(env, "aggregate", _question(batch), _answers(out, env))
  final = _decode_one(params_n, _chosen(cfg.aggregator, state), tokens, mask,
                      decoding.fold_keys(rng, 1), env)
  return core.Output(final.tokens, final.lengths, None, {"answers": history})


# -------------------------------------------------------------------------------------------------
# LLM-Blender.


@dataclasses.dataclass(frozen=True)
class BlenderConfig:
  """LLM-Blender (Jiang et al. 2023): PairRanker + GenFuser, here both pool members."""

  ranker: int = 0
  fuser: int = 0
  top_k: int = 3


def pairwise_preferences(ranker_params, question: core.Segment, answers: list[core.Segment],
                         env: core.Env) -> jax.Array:
  """pref [N, N, B]: log p("A") - log p("B") of the ranker shown candidate i as A, j as B."""
  n = len(answers)
  pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
  filled = [fill(env, "compare", question, [answers[i], answers[j]]) for i, j in pairs]
  tokens = jnp.concatenate([f[0] for f in filled])  # [P * B, T]
  mask = jnp.concatenate([f[1] for f in filled])
  hidden, _ = transformer.hidden_states(ranker_params, tokens, env.config, mask_bt=mask)
  logits = transformer.lm_head(ranker_params, hidden[:, -1:], env.config)[:, 0]
  lp = jax.nn.log_softmax(logits)
  (a,), (b,) = env.template("labels")
  margin = (lp[:, a] - lp[:, b]).reshape(len(pairs), -1)
  pref = jnp.zeros((n, n, margin.shape[1]), jnp.float32)
  for k, (i, j) in enumerate(pairs):
    pref = pref.at[i, j].set(margin[k])
  return pref


def rank_candidates(pref_nnb: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PairRanker's "max wins" aggregation: candidate i wins (i, j) when the ranker prefers it as A
  (pref[i, j] > 0) and again when it prefers it as B (pref[j, i] < 0). Score = wins, ties broken
  by the summed margins, then by the lower index. Returns (order [B, N] best first, scores)."""
  n = pref_nnb.shape[0]
  off = 1.0 - jnp.eye(n)[..., None]
  as_a = (pref_nnb > 0).astype(jnp.float32)
  as_b = (jnp.swapaxes(pref_nnb, 0, 1) < 0).astype(jnp.float32)
  wins = jnp.sum(off * (as_a + as_b), axis=1)
  margin = jnp.sum(off * (pref_nnb - jnp.swapaxes(pref_nnb, 0, 1)), axis=1)
  score = wins + 0.5 * jax.nn.sigmoid(margin)  # The margin term < 1: it only breaks ties.
  order = jnp.argsort(-score.T, axis=-1, stable=True)  # [B, N]
  return order, score.T


@core.register("llm_blender", "text", BlenderConfig, min_models=2, templates=("compare", "fuse"))
def llm_blender(params_n, batch: core.Batch, rng, *, cfg: BlenderConfig, env: core.Env,
                state=None):
  """All answer; the ranker compares every ordered pair of candidates; the top-k, best first, go
  to the fuser, which writes the final answer."""
  n = pool_lib.num_models(params_n)
  question = _question(batch)
  rng, key = decoding.split_keys(rng)
  out = _answer_all(params_n, batch.prompt, batch.prompt_mask, key, env)
  answers = _answers(out, env)
  pref = pairwise_preferences(core.member(params_n, cfg.ranker), question, answers, env)
  order, scores = rank_candidates(pref)
  k = min(cfg.top_k, n)
  rows = jnp.arange(order.shape[0])
  top = [(jnp.stack([a[0] for a in answers])[order[:, r], rows],
          jnp.stack([a[1] for a in answers])[order[:, r], rows]) for r in range(k)]
  tokens, mask = fill(env, "fuse", question, top)
  final = _decode_one(params_n, cfg.fuser, tokens, mask, rng, env)
  return core.Output(final.tokens, final.lengths, None,
                     {"answers": out.tokens, "ranking": order, "rank_scores": scores,
                      "preferences": pref})


# -------------------------------------------------------------------------------------------------
# Multi-agent debate + majority vote (the test-time half of multi-agent fine-tuning).


@dataclasses.dataclass(frozen=True)
class DebateConfig:
  """Multi-agent fine-tuning (Subramaniam et al. 2025) at test time, as the reference runs it
  (GitHub BunsenFeng/model_collaboration, model_collaboration/method/text_multiagent_finetuning.py):
  `rounds` critic rounds after the first answers (the reference's `rounds` = 2 generations: one
  critic round), each agent reading the others' answers and its own (`_build_critic_prompt_with_
  summary`), then a majority vote over the agents' extracted final answers (`vote`). The
  fine-tuning half (per-agent generator/critic data from dev debates) belongs to distillation.
  Deviations: in token space an empty answer keeps its place in the summary (the reference drops
  empty answers) and answers are not whitespace-stripped."""

  rounds: int = 1


def majority_vote(tokens_nbm: jax.Array, lengths_nb: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The answer most agents gave token for token (ties: the lowest agent index): the in-program
  choice, which the host's vote on extracted answers (`vote`) replaces wherever answers are
  read as text (`evaluate`, heterogeneous pools). Returns (winner [B], votes [N, B])."""
  n, _, m = tokens_nbm.shape
  live = jnp.arange(m)[None, None] < lengths_nb[..., None]
  t = jnp.where(live, tokens_nbm, -1)
  same = jnp.all(t[:, None] == t[None, :], axis=-1)  # [N, N, B]
  votes = jnp.sum(same, axis=1)
  return jnp.argmax(votes, axis=0), votes


def vote(keys) -> int:
  """The reference's `_majority_vote` over one row's extracted answers (keys[i]: agent i's; None:
  nothing extracted, no vote): the most frequent answer, ties broken by the smallest answer
  (lexicographic, as strings); returns the first agent that gave it (agent 0 when no agent gave
  an extractable answer: the reference then scores an empty answer, which scores 0 too)."""
  counts: dict[str, int] = {}
  for k in keys:
    if k is not None:
      counts[str(k).strip()] = counts.get(str(k).strip(), 0) + 1
  if not counts:
    return 0
  winner = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
  return next(i for i, k in enumerate(keys) if k is not None and str(k).strip() == winner)


def _vote_rows(keys, cfg, state) -> list[int]:
  del cfg, state
  return [vote(row) for row in keys]


@core.register("multiagent_finetuning", "text", DebateConfig, min_models=2, templates=("critic",),
               select=_vote_rows)
def multiagent_debate(params_n, batch: core.Batch, rng, *, cfg: DebateConfig, env: core.Env,
                      state=None):
  """Debate for `rounds` critic rounds, then majority vote over the agents' final answers
  (extracted answers on the host, `vote`; token-exact in the program)."""
  out, history, _ = _exchange_rounds(params_n, batch, rng, env, cfg.rounds, "critic")
  lengths = core.answer_lengths(out.tokens, out.lengths, env.stop_ids)
  winner, votes = majority_vote(out.tokens, lengths)
  rows = jnp.arange(winner.shape[0])
  return core.Output(out.tokens[winner, rows], out.lengths[winner, rows], None,
                     {"answers": history, "votes": votes, "winner": winner,
                      "final": (out.tokens, out.lengths)})
