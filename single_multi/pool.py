"""A pool of N same-architecture models stacked along a leading `model` axis.

Stacking is `jax.tree.map(lambda *x: jnp.stack(x), *trees)`; every pool operation is `jax.vmap`
of the single-model function over that axis. The multi-model decode loop feeds one chosen token
to all N models each step; the token comes from a pure

    combine(per_model_logits [N, B, V], state, key) -> (token [B], logprob row [B, V], state)

the hook logit- and token-level collaboration strategies plug into (the row is the collaboration's
next-token distribution: the teacher rows of logit distillation). All N caches advance together.

Pool KV cache: k [N, L, B, K, H, S], v [N, L, B, K, S, H]; pos [N, B, S]; end [] shared (all
models write the same slots, so the cache update stays a dynamic-update-slice under vmap).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from single_multi import decoding
from single_multi.models import transformer
from single_multi.models.config import ModelConfig
from single_multi.models.loading import Model, load

Params = dict[str, Any]
Combine = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, jax.Array, Any]]

# Config fields that may differ between pool members (token ids are tokenizer-side metadata).
_FREE_FIELDS = {"bos_token_id", "eos_token_ids", "pad_token_id"}


class PoolMismatchError(ValueError):
  """Models cannot be stacked: the message names the models and the differing fields."""


@dataclasses.dataclass(frozen=True)
class Pool:
  config: ModelConfig
  params: Params  # Every leaf has a leading axis of size N.
  names: tuple[str, ...]
  tokenizer: Any

  @property
  def size(self) -> int:
    return len(self.names)

  def member(self, i: int) -> Params:
    return jax.tree.map(lambda x: x[i], self.params)


def num_models(params_n) -> int:
  """How many models a stacked pool's params hold (their leading axis)."""
  return params_n["embed"].shape[0]


def stack(trees: Sequence[Params]) -> Params:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def check_stackable(models: Sequence[Model], names: Sequence[str]) -> None:
  first = models[0].config
  for name, m in zip(names[1:], models[1:]):
    if m.config.vocab_size != first.vocab_size:
      raise PoolMismatchError(
          f"vocabularies differ: {names[0]} has {first.vocab_size} tokens, {name} has "
          f"{m.config.vocab_size}; logit/token/weight-level collaboration needs one vocabulary "
          "(members with different vocabularies collaborate in text: "
          "config.pool_kind='heterogeneous')")
    diff = {f.name: (getattr(first, f.name), getattr(m.config, f.name))
            for f in dataclasses.fields(first)
            if f.name not in _FREE_FIELDS and getattr(first, f.name) != getattr(m.config, f.name)}
    if diff:
      detail = ", ".join(f"{k}: {a} vs {b}" for k, (a, b) in sorted(diff.items()))
      raise PoolMismatchError(
          f"{names[0]} and {name} have different architectures ({detail}); a stacked pool needs "
          "identical architectures (members of different architectures collaborate in text: "
          "config.pool_kind='heterogeneous')")


def from_models(models: Sequence[Model], names: Sequence[str] | None = None) -> Pool:
  if not models:
    raise ValueError("a pool needs at least one model")
  names = tuple(names or (m.source for m in models))
  if len(set(names)) != len(names):
    names = tuple(f"{n}#{i}" for i, n in enumerate(names))
  check_stackable(models, names)
  for name, m in zip(names, models):
    dtypes = {x.dtype for x in jax.tree.leaves(m.params)}
    if dtypes != {x.dtype for x in jax.tree.leaves(models[0].params)}:
      raise PoolMismatchError(f"{name} has params of dtype {dtypes}, unlike {names[0]}")
  return Pool(models[0].config, stack([m.params for m in models]), names, models[0].tokenizer)


def load_pool(sources: Sequence[str], dtype=jnp.float32) -> Pool:
  models = [load(s, dtype) for s in sources]
  return from_models(models, sources)


# -------------------------------------------------------------------------------------------------
# Heterogeneous pools: members of different architectures or tokenizers.


@dataclasses.dataclass(frozen=True)
class Groups:
  """A heterogeneous pool (`config.pool_kind="heterogeneous"`): its members grouped by
  architecture and tokenizer, each group a stacked `Pool` that decodes and distils as one vmapped
  program; the groups exchange text only (`collab.run_heterogeneous`). names: every member in
  the configured order; `params` {"group<g>": that group's stacked params} is what a checkpoint
  holds."""

  pools: tuple[Pool, ...]
  names: tuple[str, ...]

  @property
  def size(self) -> int:
    return len(self.names)

  @property
  def params(self) -> dict[str, Params]:
    return {f"group{g}": p.params for g, p in enumerate(self.pools)}

  def with_params(self, params: dict[str, Params]) -> Groups:
    return Groups(tuple(dataclasses.replace(p, params=params[f"group{g}"])
                        for g, p in enumerate(self.pools)), self.names)

  def members(self) -> list[Model]:
    """Every member as a single model, in `names` order."""
    by = {name: Model(p.config, p.member(i), p.tokenizer, name)
          for p in self.pools for i, name in enumerate(p.names)}
    return [by[n] for n in self.names]


def _tokenizer_identity(tok) -> tuple:
  return (type(tok).__name__, getattr(tok, "name_or_path", None),
          getattr(tok, "chat_template", None), len(tok) if hasattr(tok, "__len__") else None)


def group_models(models: Sequence[Model], names: Sequence[str]) -> Groups:
  """Members with one architecture and one tokenizer stacked together (in order of first
  appearance); one group is allowed (a heterogeneous run of stackable models)."""
  groups: dict[tuple, list[int]] = {}
  for i, m in enumerate(models):
    arch = tuple((f.name, getattr(m.config, f.name)) for f in dataclasses.fields(m.config)
                 if f.name not in _FREE_FIELDS)
    dtypes = tuple(sorted({str(x.dtype) for x in jax.tree.leaves(m.params)}))
    groups.setdefault((arch, dtypes, _tokenizer_identity(m.tokenizer)), []).append(i)
  pools = tuple(from_models([models[i] for i in idx], [names[i] for i in idx])
                for idx in groups.values())
  return Groups(pools, tuple(names))


def load_groups(sources: Sequence[str], dtype=jnp.float32) -> Groups:
  names = list(sources)
  if len(set(names)) != len(names):
    names = [f"{n}#{i}" for i, n in enumerate(names)]
  return group_models([load(s, dtype) for s in sources], names)


def with_params(pool: Pool | Groups, params) -> Pool | Groups:
  """The pool (stacked or grouped) holding `params` (as its `params` property gives them)."""
  if isinstance(pool, Groups):
    return pool.with_params(params)
  return dataclasses.replace(pool, params=params)


# -------------------------------------------------------------------------------------------------
# Vmapped execution.

_CACHE_AXES = {"k": 0, "v": 0, "pos": 0, "end": None}


def init_cache(config: ModelConfig, n: int, batch: int, max_len: int, dtype=jnp.float32, *,
               per_layer: bool = False):
  """transformer.init_cache with a leading pool axis N on every array but `end`."""
  one = transformer.init_cache(config, batch, max_len, dtype, per_layer=per_layer)
  stack = lambda a: jnp.broadcast_to(a, (n, *a.shape))
  return {"k": jax.tree.map(stack, one["k"]), "v": jax.tree.map(stack, one["v"]),
          "pos": stack(one["pos"]), "end": one["end"]}


def forward(params_n: Params, tokens_bt: jax.Array, config: ModelConfig, *, mask_bt=None,
            cache=None, lora=None, per_model_tokens: bool = False, extra_head=None,
            last_only: bool = False):
  """Logits [N, B, T, V] of every model (tokens [B, T], or [N, B, T] with per_model_tokens).

  extra_head [N, E, D]: E extra LM-head rows per model (e.g. Co-LLM's deferral gate), their
  logits appended after the V vocabulary logits: [N, B, T, V + E]. last_only: the heads on the
  last position only ([N, B, 1, ...]; a prefill needs no more).
  """
  tok_axis = 0 if per_model_tokens else None

  def one(params, tokens, mask, cache, lora, extra):
    hidden, cache = transformer.hidden_states(params, tokens, config, mask_bt=mask, cache=cache,
                                              lora=lora)
    if last_only:
      hidden = hidden[:, -1:]
    logits = transformer.lm_head(params, hidden, config)
    if extra is not None:
      gate = jnp.einsum("BTD,ED->BTE", hidden, extra.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
      logits = jnp.concatenate([logits, gate], axis=-1)
    return logits, cache

  cache_axes = None if cache is None else _CACHE_AXES
  return jax.vmap(one, in_axes=(0, tok_axis, tok_axis, cache_axes, 0, 0),
                  out_axes=(0, cache_axes))(params_n, tokens_bt, mask_bt, cache, lora, extra_head)


def _decode(params_n, prompt_bt, prompt_mask_bt, rng, choose, choose_state, *,
            config: ModelConfig, per_model_tokens: bool, max_new_tokens: int,
            stop_ids: tuple[int, ...], pad_id: int, return_rows: bool, lora, unstack,
            extra_head=None, prefix_p=None):
  """Pool prefill + the shared decode loop; tokens [N, B] per model or [B] shared by all.

  prompt_bt: [B, P] shared by every model, or [N, B, P] (a prompt per model and row).
  prefix_p: tokens [Pp] that every row's prompt starts with, prompt_bt then holding only the rest
  (left-padded). The prefix is prefilled once per model and its cache copied to every row, so a
  batch pays for a chat template's fixed head once, not B times. The rows see exactly the keys
  and positions of the whole prompt: a pad between prefix and rest is masked like a left pad.
  """
  decoding.check_max_new_tokens(max_new_tokens)
  params_n = decoding.unstack_for_loop(params_n, unstack, layer_axis=1)
  n = num_models(params_n)
  B, P = prompt_bt.shape[-2:]
  dtype, per_layer = params_n["embed"].dtype, transformer.is_unstacked(params_n)
  if prefix_p is None:
    cache = init_cache(config, n, B, P + max_new_tokens, dtype, per_layer=per_layer)
  else:
    Pp = prefix_p.shape[0]
    cache = init_cache(config, n, 1, Pp + P + max_new_tokens, dtype, per_layer=per_layer)
    _, cache = forward(params_n, prefix_p[None], config, cache=cache, lora=lora,
                       extra_head=extra_head, last_only=True)
    cache = transformer.broadcast_rows(cache, B, lead=1)
  logits, cache = forward(params_n, prompt_bt, config, mask_bt=prompt_mask_bt, cache=cache,
                          lora=lora, per_model_tokens=prompt_bt.ndim == 3, extra_head=extra_head,
                          last_only=True)

  def step_fn(token, live, cache):
    logits, cache = forward(params_n, token[..., None], config, mask_bt=live[..., None],
                            cache=cache, lora=lora, per_model_tokens=per_model_tokens,
                            extra_head=extra_head)
    return logits[:, :, -1], cache

  if per_model_tokens:  # Model i samples with its own key stream, fold_in(rng, i) (per row).
    rng = jax.vmap(lambda i: decoding.fold_keys(rng, i))(jnp.arange(n))
  return decoding.decode_loop(step_fn, cache, logits[:, :, -1], rng, choose, choose_state,
                              max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                              return_rows=return_rows)


@functools.partial(jax.jit, static_argnames=("config", "sampler", "max_new_tokens", "stop_ids",
                                             "pad_id", "return_rows", "unstack"))
def decode_each(params_n: Params, prompt_bt, prompt_mask_bt, rng, *, config: ModelConfig,
                sampler: Any = decoding.Greedy(), max_new_tokens: int,
                stop_ids: tuple[int, ...] = (), pad_id: int = 0, return_rows: bool = False,
                lora=None, unstack: bool | None = None, prefix_p=None) -> decoding.DecodeOutput:
  """Every model answers the prompts on its own: tokens [N, B, M]; one program for all N.

  prompt_bt: [B, P] shared, or [N, B, P]: model i answers prompt_bt[i]. prefix_p: a head [Pp]
  every prompt starts with, prompt_bt then the rest (see `_decode`; `pipeline.shared_prefix`).

  Model i samples with key `fold_in(rng, i)`: the same tokens as `decoding.decode(member i,
  rng=fold_in(rng, i))`.
  """
  return _decode(params_n, prompt_bt, prompt_mask_bt, rng, decoding.sampler_choice(sampler), None,
                 config=config, per_model_tokens=True, max_new_tokens=max_new_tokens,
                 stop_ids=stop_ids, pad_id=pad_id, return_rows=return_rows, lora=lora,
                 unstack=unstack, prefix_p=prefix_p)


@functools.partial(jax.jit, static_argnames=("config", "combine", "max_new_tokens", "stop_ids",
                                             "pad_id", "return_rows", "unstack"))
def decode_combined(params_n: Params, prompt_bt, prompt_mask_bt, rng, combine_state=None, *,
                    config: ModelConfig, combine: Combine, max_new_tokens: int,
                    stop_ids: tuple[int, ...] = (), pad_id: int = 0, return_rows: bool = False,
                    lora=None, unstack: bool | None = None, extra_head=None
                    ) -> decoding.DecodeOutput:
  """One shared continuation chosen by `combine` from all N models' logits each step.

  prompt_bt: [B, P] shared, or [N, B, P] (each model reads its own prefix, e.g. proxy tuning's
  or contrastive decoding's differently prompted copies). extra_head: see `forward`; combine then
  sees [N, B, V + E] logits.
  """
  return _decode(params_n, prompt_bt, prompt_mask_bt, rng, combine, combine_state, config=config,
                 per_model_tokens=False, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                 pad_id=pad_id, return_rows=return_rows, lora=lora, unstack=unstack,
                 extra_head=extra_head)


# -------------------------------------------------------------------------------------------------
# Basic combine functions (frozen dataclasses, so they are hashable static arguments).


@dataclasses.dataclass(frozen=True)
class TakeModel:
  """Model `index` alone decides (the pool equivalent of single-model decoding)."""

  index: int
  sampler: Any = decoding.Greedy()

  def __call__(self, logits_nbv, state, key):
    logits = logits_nbv[self.index]
    return self.sampler(logits, key), jax.nn.log_softmax(logits), state


@dataclasses.dataclass(frozen=True)
class LogitAverage:
  """Weighted average of next-token logits ("logits") or log-probs ("logprobs"), then sample."""

  weights: tuple[float, ...] | None = None  # Default: uniform.
  space: str = "logprobs"
  sampler: Any = decoding.Greedy()

  def __post_init__(self):
    if self.space not in ("logits", "logprobs"):
      raise ValueError(f"space must be 'logits' or 'logprobs', got {self.space!r}")

  def __call__(self, logits_nbv, state, key):
    n = logits_nbv.shape[0]
    w = jnp.asarray(self.weights if self.weights is not None else (1.0 / n,) * n, jnp.float32)
    if w.shape != (n,):
      raise ValueError(f"LogitAverage has {w.shape[0]} weights for a pool of {n} models")
    x = logits_nbv if self.space == "logits" else jax.nn.log_softmax(logits_nbv, axis=-1)
    fused = jnp.einsum("n,nbv->bv", w, x)
    return self.sampler(fused, key), jax.nn.log_softmax(fused), state
