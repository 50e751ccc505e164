"""Co-LLM: learning when to defer to an assistant by marginal likelihood (Shen et al., ACL 2024).

At each position a latent Z_t picks the base or the assistant to emit x_t. The gate is
p_defer = sigmoid(<w_defer, h_t>), h_t the base's last (final-norm) hidden state: one extra row of
the base's LM head. Training maximises

    log P(x) = sum_t logsumexp(log sigmoid(-l_t) + log p_base(x_t), log sigmoid(l_t) + log p_asst(x_t))

over target tokens with the assistant frozen (its gold-token log-probs precomputed by one scoring
pass, `score_assistant`). The base trains fully, with LoRA, or not at all (gate only).

Several assistants (the paper's latent variable over the base and M assistants): the gate is M
rows W [M, D], P(Z_t) = softmax([0, <W_m, h_t>]_m) (the base's logit fixed at 0, so M = 1 is the
sigmoid above), and log P(x) = sum_t logsumexp_k(log P(Z_t = k) + log p_k(x_t)); pass a list of
assistants to `make_data`.

    data = co_llm.make_data(tokens, mask, loss_mask, assistant_params, config, base_params)
    w0, stats = co_llm.init_gate(base_params, data, config)                # "method a"
    result = co_llm.train(base_params, data, config, CoLlmTrainConfig(), w_init=w0)
    eta, table = co_llm.calibrate(pool, batches, result.w_defer, row_scores)  # deferral-rate sweep

Decoding is the `co_llm` collaboration strategy (`collab/token_level.py`): both models keep KV
caches; `RandomDefer` is the random-deferral baseline.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import math
import json
import pathlib
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from single_multi import decoding, evaluate, pool as pool_lib, train as train_lib
from single_multi.collab import core, token_level
from single_multi.models import lora as lora_lib, transformer
from single_multi.models.config import ModelConfig

TRAIN_BASE = ("full", "lora", "gate")


@dataclasses.dataclass(frozen=True)
class CoLlmTrainConfig:
  """Defaults are the reference's (GitHub clinicalml/co-llm):

  - training (`scripts/train/gsm8k/deferral_finetune_with_hf_trainer.sh`): the base fine-tuned
    fully, AdamW at 2e-5 with linear decay after a 4% warmup, no weight decay, 2 epochs, batch 128;
    the deferral row is a row of the LM head, so it trains at the same learning rate
    (`gate_learning_rate=None`);
  - gate init (`collm/training/deferral_training_tools.py`, `search_deferral_initialization_v1`):
    from the mean LM-head row, AdamW at 2e-5, batch 8, one epoch in dataset order, BCE with
    weight 8 on the positive labels, base frozen;
  - weak supervision (`DeferralTrainerV2`, `..._weak-supervision.sh`): 2/3 NLL + 1/3 BCE
    (`pos_weight` 5) to labels fixed once from the original base and the assistant
    (`collm/dataset/initialization.py`, method "a"), from the mean row (no init search).

  Deviation: the reference's NLL there is over the vocabulary plus the deferral token; ours is
  over the vocabulary (the deferral logit is a separate sigmoid). Faster settings for small runs
  (a higher gate learning rate, several init epochs) are config choices, e.g.
  `configs/co_llm_bigbench.py`.
  """

  train_base: str = "full"  # "full", "lora" or "gate" (base frozen, only w_defer learns).
  lora: lora_lib.LoraConfig = lora_lib.LoraConfig(rank=16, alpha=32.0, dropout=0.0)
  optim: train_lib.OptimConfig = train_lib.OptimConfig(
      learning_rate=2e-5, schedule="linear", warmup_fraction=0.04, weight_decay=0.0)
  gate_learning_rate: float | None = None  # None: optim.learning_rate (the reference).
  epochs: float = 2.0
  steps: int = 0  # > 0: this many optimizer steps instead of `epochs`.
  batch_size: int = 128
  init: str = "a"  # "a": assistant right and base wrong; "b": base wrong; "none": mean row.
  init_epochs: int = 1
  init_batch_size: int = 8
  init_learning_rate: float = 2e-5
  init_pos_weight: float = 8.0
  weak_pos_weight: float = 5.0
  seed: int = 0

  def __post_init__(self):
    if self.train_base not in TRAIN_BASE:
      raise ValueError(f"train_base must be one of {TRAIN_BASE}, got {self.train_base!r}")
    if self.init not in ("a", "b", "none"):
      raise ValueError(f"init must be 'a', 'b' or 'none', got {self.init!r}")
    if self.steps < 0 or (self.steps == 0 and not self.epochs > 0):
      raise ValueError(f"give steps > 0 or epochs > 0, got steps={self.steps}, "
                       f"epochs={self.epochs}")

  def total_steps(self, rows: int) -> int:
    """Optimizer steps: `steps`, or `epochs` passes over `rows` rows (the last batch wraps)."""
    per_step = self.batch_size * self.optim.accumulation
    return self.steps or max(1, math.ceil(self.epochs * rows / per_step))


@flax.struct.dataclass
class TrainData:
  """Sequences [S, T] (left-padded prompt + target), loss weights on the target tokens, and the
  scoring passes: the assistant's gold log-prob and argmax-is-gold at every next-token position
  ([S, T-1]: position t predicts token t+1), and the original base's argmax-is-gold (the weak-
  supervision labels are fixed from it, as the reference fixes them before training; None when
  no base was scored)."""

  tokens: jax.Array
  mask: jax.Array
  loss_mask: jax.Array
  asst_logp: jax.Array
  asst_correct: jax.Array
  base_correct: jax.Array | None = None

  @property
  def weights(self) -> jax.Array:
    return (self.loss_mask[:, 1:] * self.mask[:, 1:]).astype(jnp.float32)


# -------------------------------------------------------------------------------------------------
# The model side.


def gold_logprobs(params, tokens, mask, config: ModelConfig, lora=None):
  """(log p(x_{t+1} | x_<=t) [B, T-1], argmax == gold [B, T-1], hidden [B, T-1, D])."""
  hidden, _ = transformer.hidden_states(params, tokens, config, mask_bt=mask, lora=lora)
  logp = jax.nn.log_softmax(transformer.lm_head(params, hidden[:, :-1], config), axis=-1)
  gold = tokens[:, 1:]
  lp = jnp.take_along_axis(logp, gold[..., None], axis=-1)[..., 0]
  return lp, jnp.argmax(logp, -1) == gold, hidden[:, :-1]


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, tokens, mask, *, config):
  lp, correct, _ = gold_logprobs(params, tokens, mask, config)
  return lp, correct


def score_assistant(params, tokens, mask, config: ModelConfig, chunk: int = 8):
  """The assistant's scoring pass over the training sequences, in chunks."""
  out = [_score(params, jnp.asarray(tokens[s:s + chunk]), jnp.asarray(mask[s:s + chunk]),
                config=config) for s in range(0, tokens.shape[0], chunk)]
  return jnp.concatenate([o[0] for o in out]), jnp.concatenate([o[1] for o in out])


def make_data(tokens, mask, loss_mask, assistant_params, config: ModelConfig,
              base_params=None) -> TrainData:
  """The training rows with the assistant's scoring pass (a list of assistants: their passes
  stacked on a last axis [S, T-1, M]) and, given `base_params`, the original base's (for the
  weak-supervision labels)."""
  if isinstance(assistant_params, (list, tuple)):
    passes = [score_assistant(a, tokens, mask, config) for a in assistant_params]
    lp, correct = (jnp.stack([q[i] for q in passes], axis=-1) for i in (0, 1))
  else:
    lp, correct = score_assistant(assistant_params, tokens, mask, config)
  base_correct = (None if base_params is None
                  else score_assistant(base_params, tokens, mask, config)[1])
  return TrainData(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(loss_mask), lp, correct,
                   base_correct)


def num_assistants(data: TrainData) -> int | None:
  """None: one assistant, unstacked ([S, T-1]); M: a list of M assistants ([S, T-1, M])."""
  return None if data.asst_logp.ndim == 2 else data.asst_logp.shape[-1]


def marginal_nll(gate_logits, base_logp, asst_logp, weights) -> jax.Array:
  """-mean_t logsumexp_k(log P(Z_t = k) + log p_k(x_t)) (weighted), k over the base and the
  assistants. One assistant: gate_logits and asst_logp shaped like base_logp, and the sum is
  logsumexp(log sigmoid(-l) + log p_base, log sigmoid(l) + log p_asst); M assistants: [..., M]."""
  if gate_logits.ndim == base_logp.ndim:
    gate_logits, asst_logp = gate_logits[..., None], asst_logp[..., None]
  choice = token_level.choice_logprobs(gate_logits)
  per = -jax.nn.logsumexp(
      choice + jnp.concatenate([base_logp[..., None], asst_logp], axis=-1), axis=-1)
  w = weights.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def defers(gate_logits, stacked: bool) -> jax.Array:
  """Where the most probable choice is an assistant (one unstacked assistant: gate logit > 0)."""
  if not stacked:
    return gate_logits > 0
  return jnp.argmax(token_level.choice_logprobs(gate_logits), axis=-1) > 0


def weighted_bce(logits, labels, weights, pos_weight: float) -> jax.Array:
  y = labels.astype(jnp.float32)
  per = -(pos_weight * y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits))
  w = weights.astype(jnp.float32)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def pseudo_labels(base_correct, asst_correct, method: str = "a") -> jax.Array:
  """"a": the assistant's argmax is gold and the base's is not; "b": the base's is not.
  asst_correct [..., M] (several assistants): one binary label per assistant."""
  if asst_correct.ndim > base_correct.ndim:
    base_correct = base_correct[..., None]
  if method == "a":
    return asst_correct & ~base_correct
  return jnp.broadcast_to(~base_correct, asst_correct.shape)


def mean_head_row(params, config: ModelConfig, num_asst: int | None = None) -> jax.Array:
  """The mean LM-head row [D] (num_asst = M: M copies [M, D]), the reference's start."""
  head = params["embed"] if config.tie_word_embeddings else params["lm_head"].T
  row = jnp.mean(head.astype(jnp.float32), axis=0)
  return row if num_asst is None else jnp.tile(row, (num_asst, 1))


# -------------------------------------------------------------------------------------------------
# Gate initialisation (base frozen).


@functools.partial(jax.jit, static_argnames=("config", "method", "pos_weight", "opt"),
                   donate_argnames=("w", "opt_state"))
def _init_step(w, opt_state, base_params, tokens, mask, weights, asst_correct, *, config,
               method, pos_weight, opt):
  """One gate-init step on one batch: the frozen base's hidden states are computed here and
  dropped after the step, so no all-rows hidden-state tensor ever exists."""
  _, base_correct, hidden = gold_logprobs(base_params, tokens, mask, config)
  hidden = jax.lax.stop_gradient(hidden.astype(jnp.float32))
  labels = pseudo_labels(base_correct, asst_correct, method)
  weights = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (labels.ndim - 2)),
                             labels.shape)
  loss, g = jax.value_and_grad(
      lambda w: weighted_bce(hidden @ w.T, labels, weights, pos_weight))(w)
  updates, opt_state = opt.update(g, opt_state, w)
  live = weights > 0
  counts = jnp.stack([jnp.sum(live), jnp.sum(labels & live),
                      jnp.sum((hidden @ w.T > 0) & live)])
  return optax.apply_updates(w, updates), opt_state, loss, counts


def init_gate(base_params, data: TrainData, config: ModelConfig,
              cfg: CoLlmTrainConfig = CoLlmTrainConfig(), *, progress: bool = False
              ) -> tuple[jax.Array, dict[str, float]]:
  """w_defer from the mean LM-head row, fitted with class-weighted BCE to the pseudo-labels on the
  frozen base's hidden states (reference: `search_deferral_initialization_v1`; with M assistants,
  each row fitted to its own assistant's labels, independently): AdamW without
  weight decay, `cfg.init_epochs` passes over the rows in order, `cfg.init_batch_size` rows a
  step. Streams: each step computes its batch's hidden states and drops them, so memory does not
  grow with the number of rows. Returns (w, {"label_rate", "defer_rate", "loss"}): the pseudo-label
  rate and the deferral rate (gate > 0, before the step) over the target tokens of the last epoch.
  """
  w = mean_head_row(base_params, config, num_assistants(data))
  if cfg.init == "none":
    return w, {}
  opt = optax.adamw(cfg.init_learning_rate, weight_decay=0.0)
  opt_state = opt.init(w)
  S, B = data.tokens.shape[0], cfg.init_batch_size
  weights = data.weights
  starts = list(range(0, S, B))
  counts = np.zeros(3)
  loss = jnp.nan
  bar = tqdm.tqdm(total=cfg.init_epochs * len(starts), desc="co_llm gate init",
                  disable=not progress)
  for epoch in range(cfg.init_epochs):
    counts = np.zeros(3)
    for s in starts:
      w, opt_state, loss, c = _init_step(
          w, opt_state, base_params, data.tokens[s:s + B], data.mask[s:s + B],
          weights[s:s + B], data.asst_correct[s:s + B], config=config, method=cfg.init,
          pos_weight=cfg.init_pos_weight, opt=opt)
      counts += np.asarray(c)
      bar.update()
  bar.close()
  live = max(counts[0], 1)
  return w, {"label_rate": float(counts[1] / live), "defer_rate": float(counts[2] / live),
             "loss": float(loss)}


# -------------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class TrainResult:
  params: Any  # The base's params (LoRA merged in when trained with LoRA).
  w_defer: jax.Array
  history: list[dict[str, float]]


def _losses(objective: str, cfg: CoLlmTrainConfig, config: ModelConfig):
  def loss_fn(trainable, frozen, batch, rng):
    if cfg.train_base == "lora":
      params = frozen["base"]
      lora = lora_lib.LoraState(trainable["lora"], cfg.lora, rng)
    else:
      params = trainable["base"] if cfg.train_base == "full" else frozen["base"]
      lora = None
    base_lp, base_correct, hidden = gold_logprobs(params, batch["tokens"], batch["mask"], config,
                                                  lora)
    gate = hidden.astype(jnp.float32) @ trainable["w"].T  # [B, T] or [B, T, M]
    weights = (batch["loss_mask"][:, 1:] * batch["mask"][:, 1:]).astype(jnp.float32)
    marginal = marginal_nll(gate, base_lp, batch["asst_logp"], weights)
    live = weights > 0
    aux = {"marginal_nll": marginal,
           "defer_rate": jnp.sum(defers(gate, trainable["w"].ndim == 2) & live)
           / jnp.maximum(jnp.sum(live), 1)}
    if objective == "co_llm":
      return marginal, aux
    nll = -jnp.sum(base_lp * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    # Labels fixed before training from the original base (not the base being trained).
    labels = pseudo_labels(batch["base_correct"], batch["asst_correct"], "a")
    bce = weighted_bce(gate, labels, weights, cfg.weak_pos_weight)
    return 2 / 3 * nll + 1 / 3 * bce, aux | {"nll": nll, "bce": bce}

  return loss_fn


def train(base_params, data: TrainData, config: ModelConfig,
          cfg: CoLlmTrainConfig = CoLlmTrainConfig(), *, w_init=None, objective: str = "co_llm",
          progress: bool = True, on_step: Callable[[int, dict], None] | None = None
          ) -> TrainResult:
  """Trains the gate (and the base: full / LoRA per cfg) on `data`.

  objective: "co_llm" (marginal likelihood) or "weak" (weak-supervision baseline:
  2/3 NLL + 1/3 BCE with pos_weight `cfg.weak_pos_weight` to the "method a" labels fixed from the
  original base, `data.base_correct`; the reference starts it from the mean row: w_init=None).
  Runs `cfg.total_steps(rows)` optimizer steps over seeded reshuffles of the rows.
  """
  if objective not in ("co_llm", "weak"):
    raise ValueError(f"objective must be 'co_llm' or 'weak', got {objective!r}")
  if objective == "weak" and num_assistants(data) is not None:
    raise ValueError("the weak-supervision baseline is defined for one assistant")
  if objective == "weak" and data.base_correct is None:
    raise ValueError("weak supervision needs the original base's labels: build the data with "
                     "make_data(..., base_params=base_params)")
  # A copy: the step donates the trainable buffers, and the caller may reuse w_init.
  w = (mean_head_row(base_params, config, num_assistants(data)) if w_init is None
       else jnp.array(w_init, jnp.float32))
  rng = jax.random.key(cfg.seed)
  trainable: dict[str, Any] = {"w": w}
  frozen: dict[str, Any] = {}
  if cfg.train_base == "full":
    trainable["base"] = jax.tree.map(jnp.copy, base_params)  # The step donates its buffers.
  else:
    frozen["base"] = base_params
  if cfg.train_base == "lora":
    trainable["lora"] = lora_lib.init(config, cfg.lora, jax.random.fold_in(rng, 1))
  S = data.tokens.shape[0]
  steps = cfg.total_steps(S)
  base_opt = train_lib.make_optimizer(cfg.optim, steps)
  gate_lr = cfg.optim.learning_rate if cfg.gate_learning_rate is None else cfg.gate_learning_rate
  gate_opt = train_lib.make_optimizer(dataclasses.replace(cfg.optim, learning_rate=gate_lr), steps)
  optimizer = optax.multi_transform(
      {"gate": gate_opt, "base": base_opt},
      {k: jax.tree.map(lambda _: "gate" if k == "w" else "base", v) for k, v in trainable.items()})
  accumulation = cfg.optim.accumulation
  step_fn = train_lib.make_train_step(_losses(objective, cfg, config), optimizer, accumulation)
  opt_state = optimizer.init(trainable)
  rows = cfg.batch_size * accumulation
  order = np.random.default_rng(cfg.seed)
  perm = np.array([], np.int64)
  history = []
  for step in tqdm.trange(steps, desc=f"co_llm train ({objective})", disable=not progress):
    if len(perm) < rows:
      perm = np.concatenate([perm, order.permutation(S)])
    idx, perm = perm[:rows], perm[rows:]
    batch = {"tokens": data.tokens[idx], "mask": data.mask[idx],
             "loss_mask": data.loss_mask[idx], "asst_logp": data.asst_logp[idx],
             "asst_correct": data.asst_correct[idx]}
    if objective == "weak":
      batch["base_correct"] = data.base_correct[idx]
    trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch,
                                            jax.random.fold_in(rng, step))
    record = {k: float(v) for k, v in metrics.items()} | {"step": step}
    history.append(record)
    if on_step is not None:
      on_step(step, record)
  if cfg.train_base == "full":
    params = trainable["base"]
  elif cfg.train_base == "lora":
    params = lora_lib.merge(base_params, trainable["lora"], cfg.lora)
  else:
    params = base_params
  return TrainResult(params, trainable["w"], history)


# -------------------------------------------------------------------------------------------------
# Decoding helpers, the random-deferral baseline, calibration, traces.


@dataclasses.dataclass(frozen=True)
class RandomDefer:
  """Baseline: defer each token to the assistant with probability `rate`, independent of input."""

  base: int
  assistant: int
  rate: float
  sampler: Any = decoding.Greedy()

  def __call__(self, logits_nbv, state, key):
    k_defer, k_sample = jax.random.split(key)
    defer = jax.random.bernoulli(k_defer, self.rate, logits_nbv.shape[1:2])
    row = jnp.where(defer[:, None], jax.nn.log_softmax(logits_nbv[self.assistant]),
                    jax.nn.log_softmax(logits_nbv[self.base]))
    step = state["step"]
    state = {"step": step + 1, "deferred": state["deferred"].at[:, step].set(defer)}
    return self.sampler(row, k_sample), row, state


def decode_random(params_n, batch: core.Batch, rng, *, rate: float, env: core.Env,
                  base: int = 0, assistant: int = 1) -> core.Output:
  B, M = batch.prompt.shape[0], env.max_new_tokens
  init = {"step": jnp.zeros((), jnp.int32), "deferred": jnp.zeros((B, M), bool)}
  out = pool_lib.decode_combined(params_n, batch.prompt, batch.prompt_mask, rng, init,
                                 combine=RandomDefer(base, assistant, rate, env.sampler),
                                 **env.decode_kw)
  live = jnp.arange(M)[None] < out.lengths[:, None]
  return core.Output(out.tokens, out.lengths, None, {"deferred": out.state["deferred"] & live})


def deferral_frequency(out: core.Output) -> float:
  live = np.arange(out.tokens.shape[-1])[None] < np.asarray(out.lengths)[:, None]
  return float(np.asarray(out.extras["deferred"]).sum() / max(live.sum(), 1))


def decode(params_n, batch: core.Batch, w_defer, *, eta: float, env: core.Env, mode="defer",
           base: int = 0, assistant: int = 1, rng=None) -> core.Output:
  cfg = token_level.CoLlmConfig(base=base, assistant=assistant, mode=mode)
  return _decode_jit(params_n, batch, jax.random.key(0) if rng is None else rng,
                     {"w_defer": w_defer, "eta": jnp.asarray(eta, jnp.float32)}, cfg=cfg, env=env)


@functools.partial(jax.jit, static_argnames=("cfg", "env"))
def _decode_jit(params_n, batch, rng, state, *, cfg, env):
  return token_level.co_llm(params_n, batch, rng, cfg=cfg, env=env, state=state)


def live_tokens(batch: core.Batch, out: core.Output) -> np.ndarray:
  """[B, M] bool: the tokens `out` generated for the batch's real rows. A filler row (a batch's
  unused slots, `pipeline.generation_batches` index -1) has an empty prompt; its tokens count in
  no rate."""
  real = np.asarray(batch.prompt_mask).any(-1)
  return real[:, None] & (np.arange(out.tokens.shape[1])[None] < np.asarray(out.lengths)[:, None])


def calibrate(params_n, batches: Sequence[core.Batch], w_defer,
              score: Callable[[list], Sequence[float]], *, env: core.Env,
              rates: Sequence[float] = tuple(r / 10 for r in range(10)), base: int = 0,
              assistant: int = 1, seed: int = 0) -> tuple[float, list[dict[str, Any]]]:
  """Sweeps deferral rates on validation batches: eta = the (1 - rate) quantile of the gate
  values seen while the base decodes alone (rate 0: eta = 1, never defer); decodes with each eta
  and scores the outputs with `score([Output per batch]) -> per-row scores`. Returns the best eta
  (ties: the lower deferral rate) and the table {rate, eta, score (the mean), ci95 (percentile
  bootstrap over the rows, `seed`), deferral} per rate."""
  alone = [decode(params_n, b, w_defer, eta=1.0, env=env, base=base, assistant=assistant)
           for b in batches]
  gates = np.concatenate([np.asarray(o.extras["gate"])[live_tokens(b, o)]
                          for b, o in zip(batches, alone)])
  table = []
  for rate in rates:
    eta = 1.0 if rate == 0 else float(np.quantile(gates, 1 - rate))
    outs = alone if rate == 0 else [decode(params_n, b, w_defer, eta=eta, env=env, base=base,
                                           assistant=assistant) for b in batches]
    live = [live_tokens(b, o) for b, o in zip(batches, outs)]
    deferred = sum(int((np.asarray(o.extras["deferred"]) & m).sum()) for o, m in zip(outs, live))
    rows = np.asarray(score(outs), np.float64)
    table.append({"rate": rate, "eta": eta, "score": float(rows.mean()),
                  "ci95": list(evaluate.bootstrap_ci(rows, seed=seed)),
                  "deferral": deferred / max(sum(int(m.sum()) for m in live), 1)})
  best = max(table, key=lambda r: (r["score"], -r["rate"]))
  return best["eta"], table


def deferral_traces(tokenizer, out: core.Output, ids: Sequence[str]) -> list[dict[str, Any]]:
  """Per example: its tokens as text pieces with the deferral flag and gate value of each."""
  traces = []
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  deferred = np.asarray(out.extras["deferred"])
  gate = np.asarray(out.extras.get("gate", np.zeros(deferred.shape)))
  for b, ex_id in enumerate(ids):
    pieces = [{"text": tokenizer.decode([int(t)]), "deferred": bool(deferred[b, k]),
               "gate": float(gate[b, k])} for k, t in enumerate(tokens[b, :lengths[b]])]
    traces.append({"id": ex_id, "tokens": pieces,
                   "deferral": float(np.mean([p["deferred"] for p in pieces])) if pieces else 0.0})
  return traces


def write_traces(traces: Sequence[dict[str, Any]], directory: str | pathlib.Path) -> pathlib.Path:
  """traces.jsonl plus traces.html (deferred tokens highlighted, gate value on hover)."""
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  with open(d / "traces.jsonl", "w") as f:
    for t in traces:
      f.write(json.dumps(t) + "\n")
  rows = []
  for t in traces:
    spans = "".join(
        f'<span title="gate {p["gate"]:.2f}"' + (' class="d"' if p["deferred"] else "") + ">"
        + html.escape(p["text"]) + "</span>" for p in t["tokens"])
    rows.append(f"<div><b>{html.escape(str(t['id']))}</b> ({t['deferral']:.0%} deferred)"
                f"<pre>{spans}</pre></div>")
  page = ("<html><head><meta charset='utf-8'><style>.d{background:#ffd54f}"
          "pre{white-space:pre-wrap}</style></head><body><p>Highlighted: tokens the assistant "
          "wrote (deferred).</p>" + "".join(rows) + "</body></html>")
  (d / "traces.html").write_text(page)
  return d / "traces.html"


# -------------------------------------------------------------------------------------------------
# Checkpoint: the base, the gate and eta together.


def save(directory: str | pathlib.Path, params, w_defer, eta: float) -> None:
  """An Orbax checkpoint of {params, w_defer, eta} (finished before returning)."""
  import orbax.checkpoint as ocp

  path = pathlib.Path(directory).absolute()
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, {"params": params, "w_defer": w_defer,
                     "eta": np.asarray(eta, np.float32)}, force=True)


def load(directory: str | pathlib.Path) -> tuple[Any, jax.Array, float]:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(pathlib.Path(directory).absolute())
  return tree["params"], jnp.asarray(tree["w_defer"]), float(tree["eta"])
