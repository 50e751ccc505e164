"""One model alone, and the strategies that decide every next token from several models' logits.

All of them run one KV-cached pool decode (`pool.decode_combined`): each step every model reads
the chosen token once; a pure combine function maps the models' logits [N, B, V] to the token and
the collaboration's log-prob row (the teacher row of logit distillation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from single_multi import decoding, pool as pool_lib
from single_multi.collab import core


def _output(out: decoding.DecodeOutput, env: core.Env, **extras) -> core.Output:
  return core.Output(out.tokens, out.lengths, out.rows if env.return_rows else None, extras)


@dataclasses.dataclass(frozen=True)
class SingleConfig:
  model: int = 0  # Which pool member answers.


@core.register("single", "single", SingleConfig)
def single(params_n, batch: core.Batch, rng, *, cfg: SingleConfig, env: core.Env, state=None):
  """One model alone (the baseline): its own KV-cached decode, the other models never run."""
  out = decoding.decode(core.member(params_n, cfg.model), batch.prompt, batch.prompt_mask, rng,
                        sampler=env.sampler, return_rows=env.return_rows, **env.decode_kw)
  return _output(out, env)


@dataclasses.dataclass(frozen=True)
class LogitFusionConfig:
  """Reference: the plain average of next-token logits. weights: None = uniform."""

  weights: tuple[float, ...] | None = None
  space: str = "logits"  # "logits" (reference) or "logprobs" (each model normalised first).


@core.register("logit_fusion", "logit", LogitFusionConfig, min_models=2,
               combine=lambda cfg, sampler, state: pool_lib.LogitAverage(cfg.weights, cfg.space,
                                                                         sampler))
def logit_fusion(params_n, batch: core.Batch, rng, *, cfg: LogitFusionConfig, env: core.Env,
                 state=None):
  """(Weighted) average of all models' next-token logits or log-probs every step, then sample.
  KV-cached (the reference recomputes the whole sequence every step)."""
  combine = pool_lib.LogitAverage(cfg.weights, cfg.space, env.sampler)
  out = pool_lib.decode_combined(params_n, batch.prompt, batch.prompt_mask, rng, combine=combine,
                                 return_rows=env.return_rows, **env.decode_kw)
  return _output(out, env)


@dataclasses.dataclass(frozen=True)
class CoLlmConfig:
  """Co-LLM decoding (Shen et al. 2024): defer to an assistant where its choice probability > eta.

  `assistant`: one pool index, or a tuple of M indices (the paper's latent variable ranges over
  the base and M assistants): the gate is then M rows, the choice distribution
  softmax([0, l_1, ..., l_M]) (the base's logit fixed at 0, so M = 1 is sigmoid(l_1)), and the
  token comes from the most probable assistant when its probability exceeds eta."""

  base: int = 0
  assistant: int | tuple[int, ...] = 1
  eta: float = 0.5
  mode: str = "defer"  # "defer": the chosen assistant's token; "compose": the choice mixture.

  def __post_init__(self):
    if not isinstance(self.assistant, (int, np.integer)):  # A list from a config: hashable.
      object.__setattr__(self, "assistant", tuple(int(i) for i in self.assistant))
    if self.mode not in ("defer", "compose"):
      raise ValueError(f"co_llm mode must be 'defer' or 'compose', got {self.mode!r}")
    if not self.assistants or self.base in self.assistants:
      raise ValueError("co_llm needs a base and one or more other pool members as assistants")
    if len(set(self.assistants)) != len(self.assistants):
      raise ValueError(f"co_llm assistants repeat a pool member: {self.assistants}")

  @property
  def assistants(self) -> tuple[int, ...]:
    a = self.assistant
    return (int(a),) if isinstance(a, (int, np.integer)) else tuple(int(i) for i in a)


def choice_logprobs(gate_logits) -> jax.Array:
  """log P(Z = base, assistant 1..M) [..., M + 1] from the M gate logits [..., M]: the base's
  logit is 0 (M = 1: log sigmoid(-l), log sigmoid(l))."""
  zero = jnp.zeros(gate_logits.shape[:-1] + (1,), gate_logits.dtype)
  return jax.nn.log_softmax(jnp.concatenate([zero, gate_logits], axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class CoLlmCombine:
  """eta rides in the combine state (traced), so a sweep over eta compiles once."""

  base: int
  assistants: tuple[int, ...]
  mode: str
  sampler: Any = decoding.Greedy()

  def __call__(self, logits_nbv, state, key):
    M = len(self.assistants)
    vocab = logits_nbv.shape[-1] - M  # The last M columns are the base's gate logits.
    choice = choice_logprobs(logits_nbv[self.base, :, vocab:].astype(jnp.float32))  # [B, M+1]
    base = jax.nn.log_softmax(logits_nbv[self.base, :, :vocab])
    asst = jax.nn.log_softmax(logits_nbv[jnp.asarray(self.assistants), :, :vocab])  # [M, B, V]
    pick = jnp.argmax(choice[:, 1:], axis=-1)  # The most probable assistant.
    gate = jnp.exp(jnp.take_along_axis(choice[:, 1:], pick[:, None], axis=-1)[:, 0])
    defer = gate > state["eta"]
    if self.mode == "defer":
      other = jnp.take_along_axis(asst, pick[None, :, None], axis=0)[0]
    else:
      rows = jnp.concatenate([base[None], asst])  # [M+1, B, V]
      other = jax.nn.logsumexp(choice.T[:, :, None] + rows, axis=0)
    row = jnp.where(defer[:, None], other, base)
    step = state["step"]
    state = dict(state, step=step + 1, gate=state["gate"].at[:, step].set(gate),
                 deferred=state["deferred"].at[:, step].set(defer),
                 choice=state["choice"].at[:, step].set(jnp.where(defer, pick + 1, 0)))
    return self.sampler(row, key), row, state


def gate_rows(params_n, w_defer, base: int) -> jax.Array:
  """extra_head [N, M, D]: the gate's rows (w_defer [D] or [M, D]) on the base's LM head, zeros
  elsewhere."""
  w = w_defer.reshape(-1, w_defer.shape[-1])
  n = pool_lib.num_models(params_n)
  return jnp.zeros((n,) + w.shape, w.dtype).at[base].set(w)


@core.register("co_llm", "token", CoLlmConfig, min_models=2)
def co_llm(params_n, batch: core.Batch, rng, *, cfg: CoLlmConfig, env: core.Env, state=None):
  """Token-level deferral: the base decodes; where the most probable assistant's choice
  probability exceeds eta, that assistant's token (or the composed mixture's) is taken. Every model
  keeps its KV cache; every chosen token is fed to all once. state: {"w_defer": [D] or [M, D]}
  (see `single_multi.co_llm`) and optionally {"eta": []}, which overrides cfg.eta without
  recompiling. extras: gate (that probability), deferred, choice (0: base, m: assistant m)."""
  if state is None or "w_defer" not in state:
    raise core.StrategyError("co_llm needs a trained gate: state={'w_defer': [hidden]} "
                             "(train it with single_multi.co_llm)")
  rows = 1 if state["w_defer"].ndim == 1 else state["w_defer"].shape[0]
  if rows != len(cfg.assistants):
    raise core.StrategyError(f"co_llm has {len(cfg.assistants)} assistants "
                             f"{cfg.assistants} but a gate of {rows} rows")
  B = batch.prompt.shape[0]
  T = env.max_new_tokens
  init = {"step": jnp.zeros((), jnp.int32), "gate": jnp.zeros((B, T), jnp.float32),
          "deferred": jnp.zeros((B, T), bool), "choice": jnp.zeros((B, T), jnp.int32),
          "eta": jnp.asarray(state.get("eta", cfg.eta), jnp.float32)}
  combine = CoLlmCombine(cfg.base, cfg.assistants, cfg.mode, env.sampler)
  out = pool_lib.decode_combined(params_n, batch.prompt, batch.prompt_mask, rng, init,
                                 combine=combine, return_rows=env.return_rows,
                                 extra_head=gate_rows(params_n, state["w_defer"], cfg.base),
                                 **env.decode_kw)
  live = jnp.arange(T)[None] < out.lengths[:, None]
  return _output(out, env, gate=out.state["gate"], deferred=out.state["deferred"] & live,
                 choice=jnp.where(live, out.state["choice"], 0))


@dataclasses.dataclass(frozen=True)
class ProxyTuningConfig:
  """Proxy tuning (Liu et al. 2024): base + alpha * (expert - anti_expert) on logits."""

  base: int = 0
  expert: int = 1
  anti_expert: int = 2
  alpha: float = 1.0


@dataclasses.dataclass(frozen=True)
class ProxyCombine:
  base: int
  expert: int
  anti_expert: int
  alpha: float
  sampler: Any = decoding.Greedy()

  def __call__(self, logits_nbv, state, key):
    lp = jax.nn.log_softmax(logits_nbv, axis=-1)
    scores = lp[self.base] + self.alpha * (lp[self.expert] - lp[self.anti_expert])
    return self.sampler(scores, key), jax.nn.log_softmax(scores), state


@core.register("proxy_tuning", "logit", ProxyTuningConfig, min_models=3,
               combine=lambda cfg, sampler, state: ProxyCombine(
                   cfg.base, cfg.expert, cfg.anti_expert, cfg.alpha, sampler))
def proxy_tuning(params_n, batch: core.Batch, rng, *, cfg: ProxyTuningConfig, env: core.Env,
                 state=None):
  """Steer the base by the difference a tuned expert makes over its untuned anti-expert."""
  combine = ProxyCombine(cfg.base, cfg.expert, cfg.anti_expert, cfg.alpha, env.sampler)
  out = pool_lib.decode_combined(params_n, batch.prompt, batch.prompt_mask, rng, combine=combine,
                                 return_rows=env.return_rows, **env.decode_kw)
  return _output(out, env)


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
  """kind "reference" (default): the reference's logit contrastive (GitHub BunsenFeng/
  model_collaboration, model_collaboration/method/logit_logit_contrastive.py): the k best and k
  worst models on dev (mean dev score; ties keep the lower index first), next-token logits
  top_1 + lam * (sum of the top k - sum of the bottom k), k = 1, lam = 0.2 (`fit`).
  kind "li": contrastive decoding (Li et al. 2023): log p_expert - beta * log p_amateur over the
  tokens with p_expert >= alpha * max p_expert."""

  kind: str = "reference"
  k: int = 1
  lam: float = 0.2
  expert: int = 0
  amateur: int = 1
  alpha: float = 0.1
  beta: float = 1.0

  def __post_init__(self):
    if self.kind not in ("reference", "li"):
      raise ValueError(f"contrastive_decoding kind must be 'reference' or 'li', got "
                       f"{self.kind!r}")


@dataclasses.dataclass(frozen=True)
class ContrastiveCombine:
  expert: int
  amateur: int
  alpha: float
  beta: float
  sampler: Any = decoding.Greedy()

  def __call__(self, logits_nbv, state, key):
    lp = jax.nn.log_softmax(logits_nbv, axis=-1)
    expert, amateur = lp[self.expert], lp[self.amateur]
    plausible = expert >= jnp.max(expert, axis=-1, keepdims=True) + jnp.log(self.alpha)
    scores = jnp.where(plausible, expert - self.beta * amateur, -jnp.inf)
    return self.sampler(scores, key), jax.nn.log_softmax(scores), state


@dataclasses.dataclass(frozen=True)
class WeightedLogits:
  """Next-token logits sum_n w_n logits_n, then sample. w: the combine state (decoding), or
  bound here (`weights`, for teacher-forced scoring; an array field: never a static argument)."""

  sampler: Any = decoding.Greedy()
  weights: Any = None

  def __call__(self, logits_nbv, state, key):
    w = jnp.asarray(self.weights if state is None else state, jnp.float32)
    fused = jnp.einsum("n,nbv->bv", w, logits_nbv.astype(jnp.float32))
    return self.sampler(fused, key), jax.nn.log_softmax(fused), state


def contrastive_weights(dev_means, k: int, lam: float) -> np.ndarray:
  """The reference's logit operation as weights on the models' logits: top_1 + lam * (top k -
  bottom k), with the models sorted by mean dev score (descending; a stable sort)."""
  order = sorted(range(len(dev_means)), key=lambda i: dev_means[i], reverse=True)
  w = np.zeros(len(dev_means), np.float32)
  w[order[0]] += 1.0
  for i in range(k):
    w[order[i]] += lam
    w[order[len(order) - k + i]] -= lam
  return w


def _fit_contrastive(pool, dev, cfg: ContrastiveConfig, env, rng):
  del env, rng
  if cfg.kind != "reference":
    return {}
  if dev is None or dev.scores is None:
    raise core.StrategyError("contrastive_decoding (kind 'reference') picks its top and bottom "
                             "models by dev scores: fit it with DevData(scores=[N, Q])")
  means = np.asarray(dev.scores, np.float64).mean(axis=1)
  return {"weights": jnp.asarray(contrastive_weights(means.tolist(), cfg.k, cfg.lam)),
          "dev_means": jnp.asarray(means, jnp.float32)}


def _contrastive_weights_of(state):
  if state is None or "weights" not in state:
    raise core.StrategyError("contrastive_decoding (kind 'reference') must be fitted on dev "
                             "first (Strategy.fit)")
  return state["weights"]


def _contrastive_combine(cfg: ContrastiveConfig, sampler, state):
  if cfg.kind == "reference":
    return WeightedLogits(sampler, _contrastive_weights_of(state))
  return ContrastiveCombine(cfg.expert, cfg.amateur, cfg.alpha, cfg.beta, sampler)


@core.register("contrastive_decoding", "logit", ContrastiveConfig, fit=_fit_contrastive,
               min_models=2, combine=_contrastive_combine)
def contrastive_decoding(params_n, batch: core.Batch, rng, *, cfg: ContrastiveConfig,
                         env: core.Env, state=None):
  """Reference: the dev-best model's logits pushed along (best - worst); "li": prefer what the
  expert finds likely and the amateur does not, among plausible tokens."""
  weights = None
  if cfg.kind == "reference":
    weights = _contrastive_weights_of(state)
    combine = WeightedLogits(env.sampler)
  else:
    combine = ContrastiveCombine(cfg.expert, cfg.amateur, cfg.alpha, cfg.beta, env.sampler)
  out = pool_lib.decode_combined(params_n, batch.prompt, batch.prompt_mask, rng, weights,
                                 combine=combine, return_rows=env.return_rows, **env.decode_kw)
  return _output(out, env)


def combine_for(name: str, cfg, sampler=decoding.Greedy(), state=None):
  """The registered per-step combine of a logit-level strategy (teacher-forced scoring, on-policy
  KD), with what its fitted `state` binds."""
  spec = core.get(name)
  if spec.combine is None:
    raise core.StrategyError(f"{name} has no per-token combine to score given tokens with; "
                             f"on-policy distillation supports {scoring_strategies()}")
  return spec.combine(cfg, sampler, state)


def scoring_strategies() -> list[str]:
  """The strategies that can score given tokens (on_policy_kd's teachers)."""
  return sorted(n for n, s in core.REGISTRY.items() if s.combine is not None)


def teacher_forced_rows(params_n, tokens_bt, mask_bt, num_rows: int, combine, env: core.Env):
  """The collaboration's log-prob rows [B, num_rows, V] for the last `num_rows` tokens of given
  sequences: every model reads the sequence once, the combine fuses each position."""
  logits, _ = pool_lib.forward(params_n, tokens_bt[:, :-1], env.config, mask_bt=mask_bt[:, :-1])
  last = logits[:, :, -num_rows:]  # [N, B, M, V]: predictions of the last M tokens.
  key = jax.random.key(0)
  rows = jax.vmap(lambda lg: combine(lg, None, key)[1], in_axes=2, out_axes=1)(last)
  return rows
