"""What every collaboration strategy shares: the batch, the output, the registry, token buffers.

A strategy is a pure, jittable function

    run(params_n, batch, rng, *, cfg, env, state) -> Output

of the stacked pool params ([N, ...] leaves), a `Batch` of tokenized prompts, an rng key, its
frozen-dataclass config `cfg` (static), the host-built static `Env` (model config, stop ids,
token-space templates) and its fitted `state` (router params, merge weights, the chosen summariser:
whatever `fit` learned on the dev split; a pytree, traced). Strategies that learn something from
dev data also register `fit(pool, dev, cfg, env, rng) -> state`. Routers (api level) whose
answer is the routed member's own answer also register `route(params_n, batch, rng, *, cfg, env,
state) -> (choice [B], extras)`: the member each row goes to, without decoding the answers, so an
evaluation that has the members' answers already takes them (`evaluate.evaluate(members=...)`).

Text-level strategies exchange answers in token space: every prompt a model sees is assembled
inside the program from pre-tokenized template pieces, the question's tokens and other models'
answer tokens, packed left-padded into a fixed-size buffer (`pack`). No host round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from single_multi import decoding
from single_multi.models.config import ModelConfig

LEVELS = ("single", "api", "text", "logit", "token", "weight")


class StrategyError(ValueError):
  """A strategy cannot run on this pool or config; the message says why."""


@flax.struct.dataclass
class Batch:
  """Tokenized prompts. `prompt`: the chat-rendered prompt a model answers directly (left-padded
  [B, T]); `question`: the bare question text's tokens (left-padded [B, Q]), which text-level
  strategies place inside their own templates."""

  prompt: jax.Array
  prompt_mask: jax.Array
  question: jax.Array
  question_mask: jax.Array
  # Optional: the head every prompt starts with [Pp] and each prompt's rest [B, R] (left-padded;
  # `pipeline.generation_batches(split_prefix=True)`), for work that runs the head once.
  prefix: jax.Array | None = None
  rest: jax.Array | None = None
  rest_mask: jax.Array | None = None


@flax.struct.dataclass
class Output:
  """tokens [B, M] / lengths [B]: the collaboration's final answers (stop token included, as in
  `decoding.DecodeOutput`). rows [B, M, V]: the collaboration's per-token log-prob rows (logit- and
  token-level strategies; None otherwise), the teacher of logit distillation. extras: the
  intermediate outputs (per-model answers [N, B, M], rankings, router choices, gate values...)."""

  tokens: jax.Array
  lengths: jax.Array
  rows: jax.Array | None = None
  extras: dict[str, Any] = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Env:
  """Static context a strategy runs in (hashable: a jit static argument)."""

  config: ModelConfig
  max_new_tokens: int
  stop_ids: tuple[int, ...]
  pad_id: int
  sampler: Any = decoding.Greedy()
  # Token-space templates: name -> tuple of pieces (token id tuples) between which the strategy
  # places questions and answers (see `templates.py`).
  templates: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...] = ()
  names: tuple[str, ...] = ()  # The pool members' names.
  return_rows: bool = False  # Logit/token-level strategies: also return the teacher rows.
  # Text-level exchange rounds prefill their template's first piece once per model and share its
  # cache across the rows (`text_level.answer_all`); False: decode the whole prompts.
  prefill_heads: bool = True
  # The decode loops' layers (`decoding.unstack_for_loop`): None per the default backend (per-layer
  # arrays on CPU, stacked elsewhere); compile_plan sets False to compile an accelerator's programs
  # on a CPU host.
  unstack: bool | None = None

  def template(self, name: str) -> tuple[tuple[int, ...], ...]:
    for key, pieces in self.templates:
      if key == name:
        return pieces
    raise StrategyError(f"no token-space template {name!r} in this Env (have "
                        f"{[k for k, _ in self.templates]}); build the Env with `make_env`")

  @property
  def decode_kw(self) -> dict[str, Any]:
    return dict(config=self.config, max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                pad_id=self.pad_id, unstack=self.unstack)


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str
  level: str
  Config: type
  run: Callable[..., Output]
  fit: Callable[..., Any] | None = None
  doc: str = ""
  min_models: int = 1
  templates: tuple[str, ...] = ()  # Names of the token-space templates `run` needs.
  # Host step after `run` (a vote on extracted answers): select(keys, cfg, state) -> the agent
  # whose answer each row keeps, where keys[b][i] is agent i's extracted answer to row b (None:
  # none) and `run` left every agent's final answers in extras["final"] ([N, B, M], [N, B]).
  select: Callable[..., list[int]] | None = None
  # Logit/token level: combine(cfg, sampler, state) -> the per-token combine of the models'
  # logits, `fn(logits [N, B, V], state, key) -> (token, log-prob row, state)`: what teacher-
  # forced scoring (on_policy_kd) fuses. None: the strategy cannot score given tokens.
  combine: Callable[..., Any] | None = None
  # API level: route(params_n, batch, rng, *, cfg, env, state) -> (choice [B] int32, extras): the
  # member whose own answer each row gets (`run` is then that answer, decoded with every member's).
  route: Callable[..., Any] | None = None


REGISTRY: dict[str, Strategy] = {}


def register(name: str, level: str, Config: type, *, fit=None, min_models: int = 1,
             templates: Sequence[str] = (), select=None, combine=None, route=None):
  """Decorator: `@register("logit_fusion", "logit", LogitFusionConfig)` on the run function."""
  if level not in LEVELS:
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

  def wrap(run):
    if name in REGISTRY:
      raise ValueError(f"strategy {name!r} registered twice")
    REGISTRY[name] = Strategy(name, level, Config, run, fit, (run.__doc__ or "").strip(),
                              min_models, tuple(templates), select, combine, route)
    return run

  return wrap


def get(name: str) -> Strategy:
  if name not in REGISTRY:
    raise StrategyError(f"unknown strategy {name!r}; registered: {sorted(REGISTRY)}")
  return REGISTRY[name]


# -------------------------------------------------------------------------------------------------
# Token buffers.


def right_align(tokens_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Left-padded rows -> (tokens moved to the front, lengths [B])."""
  lengths = jnp.sum(mask_bt > 0, axis=-1).astype(jnp.int32)
  T = tokens_bt.shape[-1]
  idx = (jnp.arange(T) + (T - lengths)[..., None]) % T
  return jnp.take_along_axis(tokens_bt, idx, axis=-1), lengths


def answer_lengths(tokens_bm: jax.Array, lengths_b: jax.Array, stop_ids: Sequence[int]
                   ) -> jax.Array:
  """Lengths of decoded answers without their final stop token."""
  last = jnp.take_along_axis(tokens_bm, jnp.maximum(lengths_b - 1, 0)[..., None], axis=-1)[..., 0]
  stops = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
  return lengths_b - ((lengths_b > 0) & jnp.isin(last, stops)).astype(jnp.int32)


Segment = tuple[jax.Array, jax.Array]  # (tokens [B, S] with the valid ones first, lengths [B]).


def piece(ids: Sequence[int], batch: int) -> Segment:
  """A fixed template piece as a segment of every row."""
  arr = jnp.asarray(np.asarray(ids, np.int32).reshape(1, -1))
  return jnp.broadcast_to(arr, (batch, arr.shape[1])), jnp.full((batch,), len(ids), jnp.int32)


def pack(segments: Sequence[Segment], length: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Concatenates variable-length segments row by row into a left-padded [B, length] buffer.

  Returns tokens and mask. Rows longer than `length` keep their last `length` tokens (the
  question's start is lost before the instruction that ends the prompt).
  """
  B = segments[0][0].shape[0]
  total = sum(s[1] for s in segments)
  width = sum(s[0].shape[1] for s in segments)
  buf = jnp.full((B, width), pad_id, jnp.int32)
  offset = jnp.zeros((B,), jnp.int32)
  rows = jnp.arange(B)[:, None]
  for tokens, lengths in segments:
    j = jnp.arange(tokens.shape[1])
    idx = jnp.where(j[None] < lengths[:, None], offset[:, None] + j[None], width)  # width: drop.
    buf = buf.at[rows, idx].set(tokens.astype(jnp.int32), mode="drop")
    offset = offset + lengths
  # Right-align the packed rows into `length` slots: slot t holds token total - length + t.
  src = total[:, None] - length + jnp.arange(length)[None]
  valid = src >= 0
  out = jnp.take_along_axis(buf, jnp.clip(src, 0, width - 1), axis=1)
  return jnp.where(valid, out, pad_id), valid.astype(jnp.int32)


def member(params_n, index) -> Any:
  """One model's params from the stacked pool (index may be traced)."""
  return jax.tree.map(lambda x: x[index], params_n)


@dataclasses.dataclass
class DevData:
  """What `fit` learns from (the dev split only): the prompts, each model's dev scores [N, Q] (of
  its own answers, e.g. 0/1 correctness), and optionally `evaluate(params) -> mean dev score` for
  strategies that search over candidate models (merge weights)."""

  batch: Batch
  scores: np.ndarray | None = None
  evaluate: Callable[[Any], float] | None = None


def batch_from(data: dict[str, Any]) -> Batch:
  """A `Batch` from a `data.pipeline.generation_batches` element."""
  split = {k: jnp.asarray(data[k]) for k in ("prefix", "rest", "rest_mask") if k in data}
  return Batch(jnp.asarray(data["tokens"]), jnp.asarray(data["mask"]),
               jnp.asarray(data["question"]), jnp.asarray(data["question_mask"]), **split)
