"""Distillation of a collaboration into every pool member at once (the "single" half of the loop).

Training examples are (prompt, collaborative output) pairs in token space: the prompt exactly as
the model saw it at generation (the tokenizer's chat template, `data.pipeline`) and the output
tokens after it; the loss covers the output tokens only. The train step is `jax.vmap` of one
model's step over the pool axis: all N models distil in one program, each with its own LoRA (or
full) params and optimizer state.

Methods:
  supervised_kd    NLL on the collaboration's outputs (every model, the same data)
  multi_student_kd each model on its own previous outputs (50%) and the best student's (50%), both
                   from the DEV split; the best student is chosen by dev score (never test)
  logit_kd         forward KL(teacher || student) to the collaboration's per-token rows
                   (logit/token-level strategies, `env.return_rows=True`)
  on_policy_kd     reverse KL(student || teacher) on the student's own samples, the teacher being
                   the collaboration's rows scored on those samples
Option: `correctness_filter` keeps only dev outputs scored correct (off by default, as in the
reference).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from single_multi import multihost, pool as pool_lib, sharding, train as train_lib
from single_multi.models import lora as lora_lib
from single_multi.models.config import ModelConfig

METHODS = ("supervised_kd", "multi_student_kd", "logit_kd", "on_policy_kd")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Reference defaults: LoRA r=64, alpha=16, dropout 0.1 on q/k/v/o; lr 1e-5 cosine, warmup 10%;
  1 epoch; batch 16 (1 x 16 accumulation)."""

  method: str = "supervised_kd"
  lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig()  # None: full fine-tuning.
  optim: train_lib.OptimConfig = train_lib.OptimConfig(learning_rate=1e-5, accumulation=16)
  batch_size: int = 1  # Micro-batch rows; x optim.accumulation per optimizer step.
  epochs: float = 1.0
  correctness_filter: bool = False
  # Rows of each member's own specialist data added to its rows (`pools.replay_rows`; 0: none,
  # as the reference).
  replay: int = 0
  seed: int = 0
  # Divergence guard: a member whose weight norm grows beyond this factor of its norm at the
  # stage's start (checked every step) stops the run (`check_step`).
  max_norm_growth: float = 10.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown distillation method {self.method!r}; choose one of {METHODS}")
    if self.replay < 0:
      raise ValueError(f"replay={self.replay!r}: give a number of rows >= 0")
    if not self.max_norm_growth > 1.0:
      raise ValueError(f"max_norm_growth={self.max_norm_growth!r}: give a factor > 1")


# -------------------------------------------------------------------------------------------------
# Losses (one model).


def forward_kl(student_logits, teacher_logprobs, weights) -> jax.Array:
  """sum_v p_T (log p_T - log p_S), mean over weighted positions."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  t = teacher_logprobs.astype(jnp.float32)
  per = jnp.sum(jnp.where(t > -jnp.inf, jnp.exp(t) * (t - s), 0.0), axis=-1)
  w = weights.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def reverse_kl(student_logits, teacher_logprobs, weights) -> jax.Array:
  """sum_v p_S (log p_S - log p_T), mean over weighted positions (teacher -inf rows clipped)."""
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  t = jnp.maximum(teacher_logprobs.astype(jnp.float32), -1e4)
  per = jnp.sum(jnp.exp(s) * (s - t), axis=-1)
  w = weights.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def sequences(prompt_bt, prompt_mask_bt, output_bm, output_len_b):
  """Prompt (left-padded) + output (its first output_len tokens) rows [B, T + M], the mask, and
  the loss mask (1 on output tokens)."""
  M = output_bm.shape[-1]
  live = jnp.arange(M)[None] < output_len_b[:, None]
  tokens = jnp.concatenate([prompt_bt, jnp.where(live, output_bm, 0)], axis=-1)
  mask = jnp.concatenate([prompt_mask_bt, live.astype(prompt_mask_bt.dtype)], axis=-1)
  loss_mask = jnp.concatenate([jnp.zeros_like(prompt_mask_bt), live.astype(jnp.int32)], axis=-1)
  return tokens.astype(jnp.int32), mask, loss_mask


def make_loss(config: ModelConfig, method: str, lora_cfg: lora_lib.LoraConfig | None,
              tail: int | None = None):
  """loss_fn(trainable, frozen, batch, rng) for one model. batch: tokens/mask/loss_mask [B, T];
  logit_kd and on_policy_kd also teacher [B, M, V]: the teacher's distribution of each of the
  last M tokens of the rows (the output, which ends every row; see `sequences`). tail: the loss
  tokens all lie in the last `tail` positions (`train.loss_tail`), the LM head runs only there."""

  def loss_fn(trainable, frozen, batch, rng):
    if lora_cfg is None:
      params, lora = trainable, None
    else:
      params, lora = frozen, lora_lib.LoraState(trainable, lora_cfg, rng)
    width = batch["teacher"].shape[1] if "teacher" in batch else tail
    logits = train_lib.next_token_logits(params, batch["tokens"], batch["mask"], config, lora,
                                         width)
    weights = batch["loss_mask"][:, 1:] * batch["mask"][:, 1:]
    if width is not None:
      weights = weights[:, -width:]
    if method in ("supervised_kd", "multi_student_kd"):
      targets = batch["tokens"][:, 1:]
      loss = train_lib.token_nll(logits, targets if width is None else targets[:, -width:],
                                 weights)
    else:
      kl = forward_kl if method == "logit_kd" else reverse_kl
      loss = kl(logits, batch["teacher"], weights)
    return loss, {}

  return loss_fn


# -------------------------------------------------------------------------------------------------
# The vmapped pool step.


def weight_norm(trainable, frozen) -> jax.Array:
  """One model's weight norm, the divergence guard's measure: with LoRA the frozen base and the
  adapters together, else the trained params (frozen is None)."""
  return optax.global_norm((trainable, frozen))


def make_pool_step(loss_fn, optimizer: optax.GradientTransformation, accumulation: int,
                   per_model_batch: bool, place: Placement | None = None):
  """step(trainable_n, opt_state_n, frozen_n, batch, rng) -> same + metrics [N]; every model
  updates from its own gradients (vmap over the pool axis); buffers donated.

  place: where the arrays live on a mesh (`Placement`): the step is jitted with those in/out
  shardings, the rng and metrics replicated. None: the step follows its inputs' placement."""

  def one(trainable, opt_state, frozen, batch, key):
    loss, aux, grads = train_lib.accumulated_grads(loss_fn, trainable, frozen, batch, key,
                                                   accumulation)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                                  "param_norm": weight_norm(trainable, frozen), **aux}

  def step(trainable_n, opt_state_n, frozen_n, batch, rng):
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)  # Raw key data (replicated over processes).
    n = jax.tree.leaves(trainable_n)[0].shape[0]
    keys = jax.random.split(rng, n)
    return jax.vmap(one, in_axes=(0, 0, 0, 0 if per_model_batch else None, 0))(
        trainable_n, opt_state_n, frozen_n, batch, keys)

  if place is None:
    return jax.jit(step, donate_argnums=(0, 1))
  return jax.jit(step, in_shardings=(place.trainable, place.opt_state, place.frozen, place.batch,
                                     place.replicated),
                 out_shardings=(place.trainable, place.opt_state, place.replicated),
                 donate_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _cached_pool_step(config: ModelConfig, method: str, lora_cfg, tail, optim, total: int,
                      per_model_batch: bool):
  """The one-device pool step of a (model, loss, optimizer schedule), built (and so compiled)
  once: its loss and optimizer are pure functions of these arguments."""
  return make_pool_step(make_loss(config, method, lora_cfg, tail),
                        train_lib.make_optimizer(optim, total), optim.accumulation,
                        per_model_batch)


def _norms(trainable_n, frozen_n):
  return jax.vmap(weight_norm, in_axes=(0, None if frozen_n is None else 0))(trainable_n,
                                                                            frozen_n)


_norms_jit = jax.jit(_norms)


def _pool_norms(trainable_n, frozen_n, out_sharding=None):
  """[N] each member's weight norm (`weight_norm`), replicated on `out_sharding` when given."""
  if out_sharding is None:
    return _norms_jit(trainable_n, frozen_n)
  return jax.jit(_norms, out_shardings=out_sharding)(trainable_n, frozen_n)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where distillation's arrays live on a mesh (`sharding.RULES`): the pool's params, the LoRA (or
  full) params and optimizer moments sharded like the params they are, each step's rows over the
  batch axes (and the pool axis for per-model rows). On an fsdp/tensor mesh no device holds a
  whole model or its optimizer state; on a data-only mesh everything but the rows is replicated."""

  mesh: Any
  frozen: Any
  trainable: Any
  opt_state: Any
  batch: Any

  @classmethod
  def make(cls, mesh, config: ModelConfig, cfg: DistillConfig, optimizer, state: DistillState,
           batch_shapes: dict[str, tuple[int, ...]], per_model_batch: bool) -> "Placement":
    n = jax.tree.leaves(state.trainable)[0].shape[0]
    params = sharding.param_shardings(config, mesh, pool_size=n)
    trainable = params if cfg.lora is None else sharding.lora_shardings(config, cfg.lora, mesh, n)
    return cls(mesh, None if cfg.lora is None else params, trainable,
               sharding.opt_state_shardings(optimizer, state.opt_state, trainable, mesh),
               {k: sharding.rows(mesh, shape, per_model_batch) for k, shape in batch_shapes.items()})

  @property
  def replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @staticmethod
  def put(tree, shardings):
    return None if tree is None else sharding.put(tree, shardings)


@dataclasses.dataclass
class DistillState:
  """What a distillation stage carries (and checkpoints): trainable params (LoRA or full) and
  optimizer states, stacked over the pool, and the step count. (The frozen base params, when
  training LoRA, travel beside it.)"""

  trainable: Any
  opt_state: Any
  step: int = 0


def init_state(params_n, config: ModelConfig, cfg: DistillConfig, total_steps: int):
  n = pool_lib.num_models(params_n)
  if cfg.lora is None:
    trainable = jax.tree.map(jnp.copy, params_n)
  else:
    keys = jax.random.split(jax.random.key(cfg.seed), n)
    trainable = jax.vmap(lambda k: lora_lib.init(config, cfg.lora, k))(keys)
  optimizer = train_lib.make_optimizer(cfg.optim, total_steps)
  return DistillState(trainable, jax.vmap(optimizer.init)(trainable)), optimizer


def merged(params_n, state: DistillState, cfg: DistillConfig):
  """The pool's params after distillation (LoRA folded in)."""
  if cfg.lora is None:
    return state.trainable
  return jax.vmap(lambda p, l: lora_lib.merge(p, l, cfg.lora))(params_n, state.trainable)


def num_steps(num_rows: int, cfg: DistillConfig) -> int:
  per_step = cfg.batch_size * cfg.optim.accumulation
  return max(1, int(np.ceil(num_rows * cfg.epochs / per_step)))


def loss_stats(losses, cfg: DistillConfig) -> dict:
  """What a round's distillation records from its per-step losses [steps, N]: the first and last
  step's loss per model, and the mean loss of the first and of the last epoch's steps (an epoch's
  steps see every row once, so these two compare the same rows; single batches do not)."""
  losses = np.asarray(losses, np.float64).reshape(len(losses), -1)
  per_epoch = max(1, min(len(losses), int(round(len(losses) / max(cfg.epochs, 1.0)))))
  return {"first_loss": losses[0].tolist(), "last_loss": losses[-1].tolist(),
          "first_epoch_loss": losses[:per_epoch].mean(0).tolist(),
          "last_epoch_loss": losses[-per_epoch:].mean(0).tolist(), "steps": len(losses)}


def step_order(num_rows: int, cfg: DistillConfig) -> np.ndarray:
  """[steps, rows per step]: the rows of every optimizer step (a seeded permutation per epoch)."""
  per_step, total = cfg.batch_size * cfg.optim.accumulation, num_steps(num_rows, cfg)
  order = np.concatenate([np.random.default_rng(cfg.seed + e).permutation(num_rows)
                          for e in range(int(np.ceil(per_step * total / num_rows)))])
  return order[:per_step * total].reshape(total, per_step)


def program(params_n, data: dict[str, jax.Array], order, config: ModelConfig,
            cfg: DistillConfig, tail: int | None = None, per_model_batch: bool = False):
  """The whole distillation as traced code (for a caller's jit): every optimizer step of the
  vmapped pool step in one `lax.scan` over `order` [steps, rows per step] (`step_order`), the
  rows shared by the pool ([R, ...]) or each model's own ([N, R, ...], per_model_batch).
  Returns (merged params, losses [steps, N])."""
  fresh, optimizer = init_state(params_n, config, cfg, order.shape[0])
  step_fn = make_pool_step(make_loss(config, cfg.method, cfg.lora, tail), optimizer,
                           cfg.optim.accumulation, per_model_batch)
  frozen = None if cfg.lora is None else params_n

  def body(carry, xs):
    idx, step = xs
    batch = jax.tree.map(lambda v: v[:, idx] if per_model_batch else v[idx], data)
    trainable, opt_state, metrics = step_fn(*carry, frozen, batch,
                                            jax.random.fold_in(jax.random.key(cfg.seed), step))
    return (trainable, opt_state), metrics["loss"]

  (trainable, _), losses = jax.lax.scan(body, (fresh.trainable, fresh.opt_state),
                                        (order, jnp.arange(order.shape[0])))
  return merged(params_n, DistillState(trainable, None), cfg), losses


class Diverged(FloatingPointError):
  """Distillation went wrong (a non-finite loss, exploding weights, a loss collapsing to
  uniform); raised before anything is saved, so the last good checkpoint stays the latest."""


def check_finite(losses: np.ndarray, first_step: int = 0) -> None:
  """Stops at the first step whose loss [steps, N] is not finite, with a clear error, before the
  caller saves anything (so the last good checkpoint stays the latest)."""
  bad = ~np.isfinite(losses)
  if bad.any():
    at = int(np.flatnonzero(bad.any(axis=-1))[0])
    raise Diverged(
        f"distillation loss is {losses[at].tolist()} at step {first_step + at} (model(s) "
        f"{np.flatnonzero(bad[at]).tolist()}); stopping before anything is saved, so the last "
        "good checkpoint stays the latest. Lower distill.learning_rate or check the training "
        "rows.")


def collapsed(first: np.ndarray, current: np.ndarray, vocab_size: int) -> np.ndarray:
  """[N] members whose loss is at least 1 nat above its first value and at 0.9 ln(V) or more
  (predictions near uniform over the vocabulary)."""
  return (current >= first + 1.0) & (current >= 0.9 * np.log(vocab_size))


def _g(values) -> str:
  return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def check_step(first: np.ndarray, loss: np.ndarray, step: int, vocab_size: int,
               learning_rate: float, first_norm: np.ndarray | None = None,
               norm: np.ndarray | None = None, growth: float = 10.0) -> None:
  """The per-step guard: stops at the first step whose loss [N] has `collapsed` from the stage's
  first loss, or whose weight norm [N] is more than `growth` times `first_norm` (the norm before
  the stage's first step)."""
  tail = ("; stopping before anything is saved, so the last good checkpoint stays the latest. "
          f"Lower distill.learning_rate (now {learning_rate:g}).")
  bad = np.flatnonzero(collapsed(first, loss, vocab_size))
  if bad.size:
    raise Diverged(
        f"distillation diverged at step {step}: loss of model(s) {bad.tolist()} rose from "
        f"{first[bad].round(4).tolist()} to {loss[bad].round(4).tolist()} (ln(vocabulary) = "
        f"{np.log(vocab_size):.4f})" + tail)
  if norm is not None:
    # Finite norms only: weights that overflowed make the next step's loss non-finite, which
    # `check_finite` reports (and the stage-end check catches an overflow at the last step).
    norm = np.asarray(norm)
    bad = np.flatnonzero(np.isfinite(norm) & (norm > growth * np.asarray(first_norm)))
    if bad.size:
      raise Diverged(
          f"distillation diverged at step {step}: weight norm of model(s) {bad.tolist()} grew "
          f"from {_g(np.asarray(first_norm)[bad])} to {_g(np.asarray(norm)[bad])}, "
          f"more than distill.max_norm_growth={growth:g} times" + tail)


def param_norms(params_n) -> np.ndarray:
  """[N] each pool member's global parameter norm."""
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
             for x in jax.tree.leaves(params_n)]
  return np.sqrt(np.asarray(sum(squares), np.float64))


def check_converging(losses: np.ndarray, norms_before: np.ndarray, norms_after: np.ndarray,
                     vocab_size: int, learning_rate: float, growth: float = 10.0) -> None:
  """Stops a distillation that diverged without a NaN: a member whose weights grew more than
  `growth`-fold, or whose loss [steps, N] ended at least 1 nat above where it started and at
  0.9 ln(V) or more (its predictions near uniform over the vocabulary). Raised before the
  caller saves anything, so the last good checkpoint stays the latest."""
  losses = np.asarray(losses, np.float64).reshape(len(losses), -1)
  ratio = np.asarray(norms_after) / np.maximum(np.asarray(norms_before), 1e-30)
  uniform = np.log(vocab_size)
  bad = np.flatnonzero((ratio > growth) | collapsed(losses[0], losses[-1], vocab_size))
  if bad.size:
    detail = "; ".join(f"model {i}: weight norm {norms_before[i]:.3g} -> {norms_after[i]:.3g}, "
                       f"loss {losses[0, i]:.4f} -> {losses[-1, i]:.4f}" for i in bad)
    raise Diverged(f"distillation diverged ({detail}; ln(vocabulary) = {uniform:.4f}); stopping "
                   "before anything is saved, so the last good checkpoint stays the latest. "
                   f"Lower distill.learning_rate (now {learning_rate:g}).")


def distill(params_n, data: dict[str, np.ndarray], config: ModelConfig, cfg: DistillConfig, *,
            per_model_batch: bool = False, state: DistillState | None = None,
            on_step=None, progress: bool = True, mesh=None):
  """Trains every pool member on `data` (rows [R, T] shared, or [N, R, T] per model) for
  cfg.epochs; resumable from `state` (its step count). Returns (new params_n, state, history).

  mesh: train on it with the arrays placed by the sharding rules (`Placement`). None: data
  parallel over every device when there are several (`multihost.data_mesh`), else one device."""
  import tqdm

  rows = next(iter(data.values())).shape[1 if per_model_batch else 0]
  total = num_steps(rows, cfg)
  fresh, optimizer = init_state(params_n, config, cfg, total)
  state = state or fresh
  frozen = None if cfg.lora is None else params_n
  tail = train_lib.loss_tail(data["loss_mask"])
  per_step = cfg.batch_size * cfg.optim.accumulation
  # Data parallel over every device of every process unless a mesh plan is given.
  mesh = mesh if mesh is not None else multihost.data_mesh(per_step)
  place = None
  if mesh is not None:
    shapes = {k: (v.shape[0], per_step) + v.shape[2:] if per_model_batch
              else (per_step,) + v.shape[1:] for k, v in data.items()}
    place = Placement.make(mesh, config, cfg, optimizer, state, shapes, per_model_batch)
    state = DistillState(place.put(state.trainable, place.trainable),
                         place.put(state.opt_state, place.opt_state), state.step)
    frozen = place.put(frozen, place.frozen)
  if place is None:  # Compiled once per (model, recipe, step count): every round reuses it.
    step_fn = _cached_pool_step(config, cfg.method, cfg.lora, tail, cfg.optim, total,
                                per_model_batch)
  else:
    step_fn = make_pool_step(make_loss(config, cfg.method, cfg.lora, tail), optimizer,
                             cfg.optim.accumulation, per_model_batch, place)
  order = step_order(rows, cfg)
  # Each member's weight norm before this call's first step: the divergence guard's reference.
  start_norm = np.asarray(_pool_norms(state.trainable, frozen, None if place is None
                                      else place.replicated), np.float64)
  history = []
  bar = tqdm.trange(state.step, total, desc=f"distill ({cfg.method})", disable=not progress,
                    initial=state.step, total=total)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for step in bar:
      idx = order[step]
      batch = {k: (v[:, idx] if per_model_batch else v[idx]) for k, v in data.items()}
      rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
      if place is not None:
        batch = place.put(batch, place.batch)
        rng = place.put(jax.random.key_data(rng), place.replicated)
      trainable, opt_state, metrics = step_fn(state.trainable, state.opt_state, frozen, batch,
                                              rng)
      state = DistillState(trainable, opt_state, step + 1)
      loss = np.asarray(metrics["loss"])
      check_finite(loss[None], first_step=step)
      norm = np.asarray(metrics["param_norm"], np.float64)
      first = loss if not history else np.asarray(history[0]["loss"])
      check_step(first, loss, step, config.vocab_size, cfg.optim.learning_rate, start_norm, norm,
                 cfg.max_norm_growth)
      history.append({"step": step, "loss": loss.tolist(), "param_norm": norm.tolist()})
      bar.set_postfix(loss=f"{loss.mean():.3f}")
      if on_step is not None:
        on_step(state)
    if place is None:
      return merged(params_n, state, cfg), state, history
    out = state.trainable
    if cfg.lora is not None:  # Folded in on the mesh, the result placed like the pool.
      out = jax.jit(lambda p, t: merged(p, DistillState(t, None), cfg),
                    out_shardings=place.frozen)(frozen, state.trainable)
  # One process: the arrays stay on the mesh. Several: every process gets the full values back,
  # for its process-local evaluation.
  return (multihost.gather(out), DistillState(*multihost.gather((state.trainable,
                                                                 state.opt_state)), state.step),
          history)


def train_pool(params_n, data: dict[str, np.ndarray], config: ModelConfig, cfg: DistillConfig, *,
               per_model_batch: bool = False, progress: bool = True, mesh=None):
  """One round's distillation of a stacked pool as the loop runs it: `distill` on `data`, then
  `check_converging` (raises `Diverged` before the caller saves anything). Returns (params_n,
  per-step losses [steps, N])."""
  before = param_norms(params_n)
  params, _, history = distill(params_n, data, config, cfg, per_model_batch=per_model_batch,
                               progress=progress, mesh=mesh)
  losses = np.asarray([h["loss"] for h in history])
  check_converging(losses, before, param_norms(params), config.vocab_size,
                   cfg.optim.learning_rate, cfg.max_norm_growth)
  return params, losses
