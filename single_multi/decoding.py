"""Prefill + `lax.while_loop` decoding over an explicit KV cache; samplers; chat helpers.

The whole decode is one jitted program (no per-token host round trip). Prompts are left-padded to
a length bucket so that prompts of nearby lengths share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from single_multi.models import transformer
from single_multi.models.config import ModelConfig


# -------------------------------------------------------------------------------------------------
# Samplers: small frozen dataclasses, `sampler(logits_bv, rng) -> tokens_b`.


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
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use Greedy() for argmax), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")

  def __call__(self, logits_bv: jax.Array, rng: jax.Array) -> jax.Array:
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


# -------------------------------------------------------------------------------------------------
# Decoding.


@flax.struct.dataclass
class DecodeOutput:
  tokens: jax.Array  # [B, max_new_tokens] generated ids; pad after a sequence has ended.
  logprobs: jax.Array  # [B, max_new_tokens] log-prob of each chosen token under the model.
  lengths: jax.Array  # [B] number of generated tokens, the stop token included.


@functools.partial(jax.jit, static_argnames=("config", "sampler", "max_new_tokens", "stop_ids",
                                             "pad_id"))
def decode(params, prompt_bt: jax.Array, prompt_mask_bt: jax.Array, rng: jax.Array, *,
           config: ModelConfig, sampler: Any = Greedy(), max_new_tokens: int,
           stop_ids: tuple[int, ...] = (), pad_id: int = 0) -> DecodeOutput:
  """Decodes a left-padded prompt batch: one-shot prefill, then one token per loop step."""
  B, P = prompt_bt.shape
  cache = transformer.init_cache(config, B, P + max_new_tokens, params["embed"].dtype)
  logits, cache = transformer.forward(params, prompt_bt, config, mask_bt=prompt_mask_bt,
                                      cache=cache)
  stop = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

  def cond(state):
    step, _, _, _, _, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, last_logits, tokens, logprobs, done, rng = state
    rng, key = jax.random.split(rng)
    token = sampler(last_logits, key)
    logp = jnp.take_along_axis(jax.nn.log_softmax(last_logits), token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, step].set(token)
    logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logp))
    live = ~done
    done = done | jnp.isin(token, stop)
    logits, cache = transformer.forward(params, token[:, None], config, mask_bt=live[:, None],
                                        cache=cache)
    return step + 1, cache, logits[:, -1], tokens, logprobs, done, rng

  state = (jnp.zeros((), jnp.int32), cache, logits[:, -1],
           jnp.full((B, max_new_tokens), pad_id, jnp.int32), jnp.zeros((B, max_new_tokens)),
           jnp.zeros((B,), bool), rng)
  _, _, _, tokens, logprobs, done, _ = jax.lax.while_loop(cond, body, state)
  is_stop = jnp.isin(tokens, stop)
  first_stop = jnp.argmax(is_stop, axis=1)
  lengths = jnp.where(jnp.any(is_stop, axis=1), first_stop + 1, max_new_tokens)
  return DecodeOutput(tokens, logprobs, lengths)


def bucket_length(n: int, minimum: int = 16) -> int:
  """Prompt length buckets: powers of two from `minimum`, so few shapes are ever compiled."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


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
  ids = [tok(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else encode_chat(tok, p)
         for p in prompts]
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  prompt, mask = left_pad(ids, pad_id)
  out = decode(model.params, jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(seed),
               config=model.config, sampler=sampler, max_new_tokens=max_new_tokens,
               stop_ids=stop_ids_for(model.config, tok), pad_id=pad_id)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tok.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens, lengths)]
