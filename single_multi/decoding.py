"""Prefill + `lax.while_loop` decoding over an explicit KV cache; samplers; chat helpers.

The whole decode is one jitted program (no per-token host round trip). Prompts are left-padded to
a length bucket so that prompts of nearby lengths share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from single_multi.models import transformer
from single_multi.models.config import ModelConfig


# -------------------------------------------------------------------------------------------------
# Keys. A decode takes one key, one key per model [N], or one key per row ([B], or [N, B] in a
# pool): per-row keys make each row's samples independent of the batch it is decoded in (its
# size, its length bucket, its process), e.g. `row_keys(key, example numbers)`.


def fold_keys(keys: jax.Array, data) -> jax.Array:
  """fold_in(key, data) for one key or elementwise for an array of keys."""
  if keys.ndim == 0:
    return jax.random.fold_in(keys, data)
  flat = keys.reshape(-1)
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(flat).reshape(keys.shape)


def split_keys(keys: jax.Array, num: int = 2) -> jax.Array:
  """[num, *keys.shape]: `num` independent keys from each key (one key: jax.random.split)."""
  if keys.ndim == 0:
    return jax.random.split(keys, num)
  flat = jax.vmap(lambda k: jax.random.split(k, num), out_axes=1)(keys.reshape(-1))
  return flat.reshape((num, *keys.shape))


def row_keys(key: jax.Array, numbers) -> jax.Array:
  """[B] keys: fold_in(key, numbers[b]) (e.g. stable numbers of the rows' example ids)."""
  return jax.vmap(lambda n: jax.random.fold_in(key, n))(jnp.asarray(numbers, jnp.uint32))


def _per_key(fn, logits, rng):
  """fn(logits [..., V], one key), mapped over the leading axes that `rng` has keys for."""
  for _ in range(rng.ndim):
    fn = jax.vmap(fn)
  return fn(logits, rng)


# -------------------------------------------------------------------------------------------------
# Samplers: small frozen dataclasses, `sampler(logits [..., V], rng) -> tokens [...]`, where rng
# is one key or one key per leading index (per model, per row).


@dataclasses.dataclass(frozen=True)
class Greedy:
  def __call__(self, logits_bv: jax.Array, rng: jax.Array) -> jax.Array:
    del rng
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Temperature sampling restricted to the top-k tokens and/or the top-p nucleus."""

  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k restriction.
  top_p: float = 1.0  # 1.0: no nucleus restriction.

  def __post_init__(self):
    if not math.isfinite(self.temperature) or self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")

  def __call__(self, logits_bv: jax.Array, rng: jax.Array) -> jax.Array:
    if rng.ndim:
      return _per_key(self._one, logits_bv, rng)
    return self._one(logits_bv, rng)

  def _one(self, logits_bv: jax.Array, rng: jax.Array) -> jax.Array:
    logits = logits_bv.astype(jnp.float32) / self.temperature
    neg = jnp.finfo(jnp.float32).min
    if self.top_k:
      kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
      logits = jnp.where(logits < kth, neg, logits)
    if self.top_p < 1.0:
      sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
      probs = jax.nn.softmax(sorted_logits, axis=-1)
      # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < p.
      mass_before = jnp.cumsum(probs, axis=-1) - probs
      kept = jnp.where(mass_before < self.top_p, sorted_logits, jnp.inf)
      threshold = jnp.min(kept, axis=-1, keepdims=True)
      logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def make_sampler(temperature: float, top_p: float = 1.0, top_k: int = 0):
  """The sampler of a temperature (0: greedy), nucleus mass and top-k; the one constructor the
  chat CLI and the loop share."""
  if not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
  if temperature == 0:
    return Greedy()
  return Sampling(temperature=temperature, top_p=top_p, top_k=top_k)


# -------------------------------------------------------------------------------------------------
# Decoding.


@flax.struct.dataclass
class DecodeOutput:
  """What a decode returns. Leading dims of `tokens` are those of the chosen tokens: [B] for one
  model or a combined pool, [N, B] for a pool decoding independently; M = max_new_tokens."""

  tokens: jax.Array  # [..., M] generated ids; pad_id after a sequence has stopped.
  logprobs: jax.Array  # [..., M] log-prob of each chosen token under the choosing distribution.
  lengths: jax.Array  # [...] number of generated tokens, the stop token included.
  rows: jax.Array | None = None  # [..., M, V] full log-prob rows (return_rows=True), 0 after stop.
  state: Any = None  # The final state of a pool's combine function.


def sampler_choice(sampler):
  """A sampler as a `choose(logits, state, key) -> (token, logprob_row, state)` function.

  With per-model keys [N] (a pool decoding independently) each model samples with its own key;
  with per-row keys each row with its own.
  """

  def choose(logits, state, key):
    return sampler(logits, key), jax.nn.log_softmax(logits.astype(jnp.float32)), state

  return choose


def _split(rng):
  """`rng, key = split(rng)` for one key or for a vector of per-model keys."""
  rng, key = split_keys(rng)
  return rng, key


def check_max_new_tokens(max_new_tokens: int) -> None:
  """At trace time (a static argument): before any cache is sized from it."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def decode_loop(step_fn, cache, logits, rng, choose, choose_state=None, *, max_new_tokens: int,
                stop_ids: tuple[int, ...] = (), pad_id: int = 0, return_rows: bool = False,
                limits=None) -> DecodeOutput:
  """The decode loop shared by single-model and pool decoding.

  step_fn(token, live, cache) -> (next logits, cache) feeds the chosen tokens to the model(s);
  choose(logits, state, key) -> (token, logprob row [..., V], state) picks them. A sequence stops
  at a stop token or after `limits` (per-sequence caps, default max_new_tokens) tokens.
  """
  check_max_new_tokens(max_new_tokens)
  choice_shape = jax.eval_shape(choose, logits, choose_state, rng)
  shape, vocab = choice_shape[0].shape, choice_shape[1].shape[-1]
  # A key per chosen token (per row): step t's key is fold_in(row key, t), so a row's samples do
  # not depend on the other rows. Otherwise (one key, per-model keys) a split chain.
  per_row = rng.ndim > 0 and tuple(rng.shape) == tuple(shape)
  stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
  if limits is None:
    limits = jnp.full(shape, max_new_tokens, jnp.int32)

  def cond(carry):
    return (carry["step"] < max_new_tokens) & ~jnp.all(carry["done"])

  def body(carry):
    step, done = carry["step"], carry["done"]
    if per_row:
      rng, key = carry["rng"], fold_keys(carry["rng"], step)
    else:
      rng, key = _split(carry["rng"])
    token, row, state = choose(carry["logits"], carry["state"], key)
    token = jnp.where(done, pad_id, token)
    logp = jnp.take_along_axis(row, token[..., None], axis=-1)[..., 0]
    out = dict(carry, rng=rng, state=state, step=step + 1)
    out["tokens"] = carry["tokens"].at[..., step].set(token)
    out["logprobs"] = carry["logprobs"].at[..., step].set(jnp.where(done, 0.0, logp))
    if return_rows:
      out["rows"] = carry["rows"].at[..., step, :].set(jnp.where(done[..., None], 0.0, row))
    out["lengths"] = carry["lengths"] + (~done).astype(jnp.int32)
    out["done"] = done | jnp.isin(token, stop) | (step + 1 >= limits)
    out["logits"], out["cache"] = step_fn(token, ~done, carry["cache"])
    return out

  carry = {
      "step": jnp.zeros((), jnp.int32), "cache": cache, "logits": logits, "rng": rng,
      "state": choose_state, "done": jnp.zeros(shape, bool),
      "lengths": jnp.zeros(shape, jnp.int32),
      "tokens": jnp.full((*shape, max_new_tokens), pad_id, jnp.int32),
      "logprobs": jnp.zeros((*shape, max_new_tokens), jnp.float32),
      "rows": jnp.zeros((*shape, max_new_tokens, vocab), jnp.float32) if return_rows else None,
  }
  c = jax.lax.while_loop(cond, body, carry)
  return DecodeOutput(c["tokens"], c["logprobs"], c["lengths"], c["rows"], c["state"])


def unstack_for_loop(params, unstack: bool | None, layer_axis: int = 0):
  """Params for a decode loop: unstacked layers on CPU by default (see transformer.unstack_layers)."""
  if unstack is None:
    unstack = jax.default_backend() == "cpu"
  return transformer.unstack_layers(params, layer_axis) if unstack else params


@functools.partial(jax.jit, static_argnames=("config", "sampler", "max_new_tokens", "stop_ids",
                                             "pad_id", "return_rows", "unstack"))
def decode(params, prompt_bt: jax.Array, prompt_mask_bt: jax.Array, rng: jax.Array, *,
           config: ModelConfig, sampler: Any = Greedy(), max_new_tokens: int,
           stop_ids: tuple[int, ...] = (), pad_id: int = 0, return_rows: bool = False,
           limits_b: jax.Array | None = None, lora=None, unstack: bool | None = None) -> DecodeOutput:
  """Decodes a left-padded prompt batch with one model: one-shot prefill, then one token a step.

  unstack: run layers from per-layer arrays (default: on CPU), see `transformer.unstack_layers`.
  """
  check_max_new_tokens(max_new_tokens)
  params = unstack_for_loop(params, unstack)
  B, P = prompt_bt.shape
  cache = transformer.init_cache(config, B, P + max_new_tokens, params["embed"].dtype,
                                per_layer=transformer.is_unstacked(params))
  hidden, cache = transformer.hidden_states(params, prompt_bt, config, mask_bt=prompt_mask_bt,
                                            cache=cache, lora=lora)
  # The LM head on the last (left-padded: always real) position only: the next token's logits.
  # Over every prompt position it would be P times the work and a [B, P, V] buffer.
  first = transformer.lm_head(params, hidden[:, -1:], config)[:, -1]

  def step_fn(token_b, live_b, cache):
    logits, cache = transformer.forward(params, token_b[:, None], config, mask_bt=live_b[:, None],
                                        cache=cache, lora=lora)
    return logits[:, -1], cache

  return decode_loop(step_fn, cache, first, rng, sampler_choice(sampler),
                     max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                     return_rows=return_rows, limits=limits_b)


def bucket_length(n: int, minimum: int = 16, fine: bool = False) -> int:
  """Length buckets: powers of two from `minimum`, so few shapes are ever compiled; `fine` adds
  the 1.5x steps between them (16, 24, 32, 48, ...: at most a third padding, twice the shapes)."""
  pow2 = max(minimum, 1 << (max(n, 1) - 1).bit_length())
  if fine and pow2 > minimum and n <= pow2 * 3 // 4:
    return pow2 * 3 // 4
  return pow2


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to `length` (default: the bucket of the longest). Returns ids, mask."""
  longest = max(len(s) for s in sequences)
  length = length or bucket_length(longest)
  if longest > length:
    raise ValueError(f"a sequence has {longest} tokens, more than the padded length {length}")
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for i, s in enumerate(sequences):
    if len(s):
      ids[i, -len(s):] = s
      mask[i, -len(s):] = 1
  return ids, mask


# -------------------------------------------------------------------------------------------------
# Text in, text out.


def encode_chat(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
  """Token ids of a chat rendered with the tokenizer's chat template, ready for the reply."""
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; pass plain "
                     "token ids or a tokenizer that defines one")
  text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_id_of(tokenizer) -> int:
  """The tokenizer's pad id; 0 when it has none (or there is no tokenizer)."""
  pad = getattr(tokenizer, "pad_token_id", None)
  return 0 if pad is None else int(pad)


def stop_ids_for(config: ModelConfig, tokenizer) -> tuple[int, ...]:
  ids = set(config.eos_token_ids)
  if tokenizer is not None and tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  return tuple(sorted(ids))


def generate(model, prompts: Sequence[Sequence[dict[str, str]] | str], *, max_new_tokens: int = 128,
             sampler: Any = Greedy(), seed: int = 0) -> list[str]:
  """Replies to a batch of chats (lists of {"role", "content"}) or raw strings, as text."""
  tok = model.tokenizer
  if tok is None:
    raise ValueError("this model was loaded without a tokenizer (tokenizer=False)")
  check_max_new_tokens(max_new_tokens)
  if not prompts:
    return []
  ids = [tok(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else encode_chat(tok, p)
         for p in prompts]
  longest = max(len(i) for i in ids)
  context = model.config.max_position_embeddings
  if context and longest + max_new_tokens > context:
    raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                     f"the model's context of {context} tokens; shorten the prompt or lower "
                     "max_new_tokens")
  pad_id = pad_id_of(tok)
  prompt, mask = left_pad(ids, pad_id)
  out = decode(model.params, jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(seed),
               config=model.config, sampler=sampler, max_new_tokens=max_new_tokens,
               stop_ids=stop_ids_for(model.config, tok), pad_id=pad_id)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tok.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens, lengths)]
