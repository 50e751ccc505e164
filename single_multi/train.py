"""Optimizers and the jitted train step shared by distillation and Co-LLM training.

    opt = train.make_optimizer(train.OptimConfig(learning_rate=1e-5), total_steps=1000)
    step = train.make_train_step(loss_fn, opt, accumulation=4)
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, rng)

`loss_fn(trainable, frozen, micro_batch, rng) -> (loss, aux dict of scalars)`. The batch's leaves
carry accumulation * micro-batch rows; the step scans over the micro-batches (`lax.scan`, so one
compiled body however many), averages gradients and metrics, clips, updates. `trainable` and the
optimizer state are donated: their buffers are reused for the new values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from single_multi.models import lora as lora_lib, transformer

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine/linear decay to 0 (or constant), global-norm clipping."""

  learning_rate: float = 1e-5
  schedule: str = "cosine"
  warmup_fraction: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float = 1.0  # 0: no clipping.
  b1: float = 0.9
  b2: float = 0.999
  accumulation: int = 1  # Micro-batches per optimizer step.

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
    if self.accumulation < 1:
      raise ValueError(f"accumulation must be >= 1, got {self.accumulation}")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  warm = int(round(cfg.warmup_fraction * total_steps))
  rest = max(total_steps - warm, 1)
  decay = {"cosine": optax.cosine_decay_schedule(cfg.learning_rate, rest),
           "linear": optax.linear_schedule(cfg.learning_rate, 0.0, rest),
           "constant": optax.constant_schedule(cfg.learning_rate)}[cfg.schedule]
  if not warm:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), decay], [warm])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def accumulated_grads(loss_fn: LossFn, trainable, frozen, batch, rng, accumulation: int):
  """Mean loss, aux and gradients over `accumulation` micro-batches (a `lax.scan`).

  Micro-batch a holds rows a, a + A, a + 2A, ... (strided): when the rows are sharded in
  contiguous blocks over a data axis, every micro-batch stays spread over all of its devices.
  """
  micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accumulation, accumulation,
                                           *x.shape[1:]).swapaxes(0, 1), batch)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(acc, xs):
    mb, key = xs
    (loss, aux), grads = grad_fn(trainable, frozen, mb, key)
    acc = jax.tree.map(jnp.add, acc, (loss, aux, grads))
    return acc, None

  (loss, aux), grads = jax.eval_shape(lambda: grad_fn(trainable, frozen,
                                                      jax.tree.map(lambda x: x[0], micro), rng))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss, aux, grads))
  keys = jax.random.split(rng, accumulation)
  total, _ = jax.lax.scan(body, zeros, (micro, keys))
  return jax.tree.map(lambda x: x / accumulation, total)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    accumulation: int = 1, donate: bool = True):
  """A jitted step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)."""

  def step(trainable, opt_state, frozen, batch, rng):
    loss, aux, grads = accumulated_grads(loss_fn, trainable, frozen, batch, rng, accumulation)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def next_token_logits(params, tokens_bt, mask_bt, config, lora=None, tail: int | None = None):
  """Logits [B, tail, V] predicting the last `tail` tokens of each row (all T-1 when None): the
  LM head (the largest matmul and the [.., V] softmax) runs only where a loss will be taken."""
  hidden, _ = transformer.hidden_states(params, tokens_bt[:, :-1], config,
                                        mask_bt=mask_bt[:, :-1], lora=lora)
  if tail is not None:
    hidden = hidden[:, -tail:]
  return transformer.lm_head(params, hidden, config)


def loss_tail(loss_mask: np.ndarray, minimum: int = 8) -> int:
  """The (bucketed) number of final positions that hold every row's loss tokens (answers end the
  rows), so the loss needs logits there only."""
  from single_multi import decoding

  lm = np.asarray(loss_mask).reshape(-1, loss_mask.shape[-1])
  T = lm.shape[-1]
  has = lm.any(axis=-1)
  first = np.where(has, np.argmax(lm > 0, axis=-1), T)
  return min(T - 1, decoding.bucket_length(int((T - first).max(initial=1)), minimum=minimum))


@jax.custom_vjp
def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position, in float32: logsumexp minus the target's logit.

  Its gradient is written out, softmax - onehot(target), one elementwise pass over the [.., V]
  logits (autodiff of log_softmax + take_along_axis makes a zero [.., V] buffer, scatters into
  it and adds several passes; under a vmapped pool that chain was the largest non-matmul cost).
  Only the logits and the per-position logsumexp are kept for the backward pass.
  """
  return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
  x = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  return lse - picked, (logits, targets, lse)


def _cross_entropy_bwd(res, g):
  logits, targets, lse = res
  onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
  grad = (jnp.exp(logits.astype(jnp.float32) - lse[..., None]) - onehot) * g[..., None]
  return grad.astype(logits.dtype), np.zeros(targets.shape, jax.dtypes.float0)


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array) -> jax.Array:
  """Mean negative log-likelihood over weighted target tokens (weights 0 on pads/prompts)."""
  w = weights_bt.astype(jnp.float32)
  return jnp.sum(cross_entropy(logits_btv, targets_bt) * w) / jnp.maximum(jnp.sum(w), 1.0)


def finetune(params, tokens, mask, loss_mask, config, *, optim: OptimConfig, steps: int,
             batch_size: int, lora=None, seed: int = 0, progress: bool = True,
             desc: str = "finetune", merge_lora: bool = True):
  """Supervised fine-tuning of one model on sequences [S, T] (left-padded), NLL on the tokens
  where loss_mask is 1 (position t predicts token t+1). lora: a `lora.LoraConfig` to train LoRA
  (merged into the returned params, or returned alone with merge_lora=False) instead of all
  params. Returns (params, history)."""
  tail = loss_tail(loss_mask)

  def loss_fn(trainable, frozen, batch, rng):
    if lora is None:
      p, lo = trainable, None
    else:
      p, lo = frozen, lora_lib.LoraState(trainable, lora, rng)
    logits = next_token_logits(p, batch["tokens"], batch["mask"], config, lo, tail)
    weights = (batch["loss_mask"][:, 1:] * batch["mask"][:, 1:])[:, -tail:]
    return token_nll(logits, batch["tokens"][:, 1:][:, -tail:], weights), {}

  rng = jax.random.key(seed)
  # A copy of params when they train: the step donates (reuses) the trainable buffers.
  trainable = (jax.tree.map(jnp.copy, params) if lora is None
               else lora_lib.init(config, lora, jax.random.fold_in(rng, 1)))
  frozen = None if lora is None else params
  optimizer = make_optimizer(optim, steps)
  opt_state = optimizer.init(trainable)
  step_fn = make_train_step(loss_fn, optimizer, optim.accumulation)
  order = np.random.default_rng(seed)
  rows, perm, history = batch_size * optim.accumulation, np.array([], np.int64), []
  bar = tqdm.trange(steps, desc=desc, disable=not progress)
  for step in bar:
    if len(perm) < rows:
      perm = np.concatenate([perm, order.permutation(tokens.shape[0])])
    idx, perm = perm[:rows], perm[rows:]
    batch = {"tokens": tokens[idx], "mask": mask[idx], "loss_mask": loss_mask[idx]}
    trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                            jax.random.fold_in(rng, step))
    history.append({"step": step, "loss": float(metrics["loss"])})
    bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
  if lora is not None and merge_lora:
    trainable = lora_lib.merge(params, trainable, lora)
  return trainable, history
