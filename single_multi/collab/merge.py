"""Weight-level collaboration: merge the pool into one model, then decode with it.

The merge is mergekit's (GitHub arcee-ai/mergekit at a6e4028, `merge_methods/
generalized_task_arithmetic.py`, `sparsify.py`, `merge_methods/linear.py`, `merge_methods/
registry.py`), which the reference toolkit calls (GitHub BunsenFeng/model_collaboration,
`model_collaboration/method/weight_dare_ties.py`: a YAML with each model's `weight` only,
`merge_method: dare_ties`, `base_model`, so every other parameter is mergekit's default).

Task vectors d_i = theta_i - base, per tensor (a layer's weight is one tensor, as in a HF
checkpoint), weights w_i:
  sparsify   magnitude (ties): keep the int(density * size) largest |d_i|; random (dare_*):
             keep each entry with probability `density`, then rescale so the tensor's L1 norm is
             unchanged (mergekit's `rescale`, L1; skipped when a norm is < 1e-7). density >= 1:
             no sparsification (mergekit's default density is 1.0).
  consensus  (ties, dare_ties) the sign of sum_i w_i d_i (>= 0: +) per entry; only entries of
             w_i d_i with that sign are summed.
  normalize  divide the sum by sum_i w_i over the kept entries (0 -> 1).
  result     base + lam * sum.
  linear     sum_i w_i theta_i (/ sum_i w_i when normalize).

| method          | sparsify  | consensus | normalize | rescale |  (mergekit's defaults)
| linear          | -         | -         | True      | -       |
| task_arithmetic | -         | -         | False     | -       |
| ties            | magnitude | sum       | True      | False   |
| dare_ties       | random    | sum       | False     | True    |
| dare_linear     | random    | -         | False     | True    |

The base (`state["base"]`, the model the members were fine-tuned from: `config.merge_base`, or
the specialists' base) is required by every method but `linear`: merging task vectors against the
members' own mean makes them sum to zero, so the sign election is noise. Weights: uniform (the
reference's mode "average"), or searched on dev by the reference's particle swarm (mode
"optimized": softmax of the swarm's positions; `NumericSwarm`).

Deliberate deviations: the arithmetic runs in float32 and is cast to the params' dtype (the
reference asks mergekit for float16); DARE's masks come from a JAX key (`seed`), not torch's RNG.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from single_multi import decoding, pool as pool_lib
from single_multi.collab import core

# method -> (sparsification, consensus, normalize, rescale): mergekit's registry defaults.
METHODS: dict[str, tuple[str | None, str | None, bool, bool]] = {
    "linear": (None, None, True, False),
    "task_arithmetic": (None, None, False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", None, False, True),
}
NEEDS_BASE = tuple(m for m in METHODS if m != "linear")  # Merges of task vectors.
_EPS = 1e-7  # mergekit's rescale tolerance.


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """A mergekit merge (defaults: mergekit's, as the reference calls it) and the reference's weight
  search. normalize / rescale None: the method's mergekit default (table above)."""

  method: str = "dare_ties"
  weights: tuple[float, ...] | None = None  # None: uniform, or the searched ones (`fit`).
  density: float = 1.0  # Kept fraction (magnitude) / keep probability (random); 1: keep all.
  lam: float = 1.0  # mergekit's `lambda`: the merged task vector's scale.
  normalize: bool | None = None
  rescale: bool | None = None
  search: str = "uniform"  # "uniform" (the reference's mode "average") or "pso" ("optimized").
  seed: int = 0  # DARE's masks and the swarm.
  # The swarm (search="pso"): the reference's weight_dare_ties.py / NumericSwarm defaults.
  population: int = 5
  iterations: int = 5
  inertia: float = 0.2
  cognitive_coeff: float = 0.3
  social_coeff: float = 0.4
  repel_coeff: float = 0.05
  repel_term: bool = True
  step_length: float = 0.5
  step_length_factor: float = 0.95
  minimum_step_length: float = 0.1
  patience: int = 5
  restart_patience: int = 3

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"merge method must be one of {list(METHODS)}, got {self.method!r}")
    if not 0 < self.density <= 1:
      raise ValueError(f"density must be in (0, 1], got {self.density}")
    if self.search not in ("uniform", "pso"):
      raise ValueError(f"merge search must be 'uniform' or 'pso', got {self.search!r}")

  @property
  def options(self) -> dict[str, Any]:
    _, _, normalize, rescale = METHODS[self.method]
    return dict(method=self.method, density=self.density, lam=self.lam,
                normalize=normalize if self.normalize is None else self.normalize,
                rescale=rescale if self.rescale is None else self.rescale)


# -------------------------------------------------------------------------------------------------
# The merge.


def _layered(params_n) -> list[bool]:
  """Per leaf: does it stack the layers ([N, L, ...]), so that one tensor is one [n, l] slice?"""
  stacked = isinstance(params_n.get("layers"), dict)
  return [stacked and getattr(path[0], "key", None) == "layers"
          for path, _ in jax.tree_util.tree_flatten_with_path(params_n)[0]]


def _per_tensor(fn, layered: bool):
  """fn over one tensor, mapped over the models (and the layers of a stacked leaf)."""
  return jax.vmap(jax.vmap(fn)) if layered else jax.vmap(fn)


def _tensor_keys(key, leaf, layered: bool):
  count = leaf.shape[0] * (leaf.shape[1] if layered else 1)
  keys = jax.random.split(key, count)
  return keys.reshape((leaf.shape[0], leaf.shape[1])) if layered else keys


def sparsity_masks(deltas_n, *, method: str, density: float, key=None):
  """The masks (1: kept) mergekit's sparsification applies to each task vector [N, ...] per
  tensor; None where the method keeps everything (density 1, or no sparsification)."""
  sparsify = METHODS[method][0]
  leaves, treedef = jax.tree.flatten(deltas_n)
  if sparsify is None or density >= 1:
    return treedef.unflatten([None] * len(leaves))
  keys = jax.random.split(key if key is not None else jax.random.key(0), len(leaves))

  def magnitude(d):  # The int(density * size) largest |d| (mergekit: argsort, exactly k).
    k = int(density * d.size)
    if k <= 0:
      raise core.StrategyError(f"density {density} keeps no entry of a tensor of {d.size}")
    idx = jax.lax.top_k(jnp.abs(d).reshape(-1), k)[1]
    return jnp.zeros((d.size,), jnp.float32).at[idx].set(1.0).reshape(d.shape)

  out = []
  for d, k, layered in zip(leaves, keys, _layered(deltas_n)):
    if sparsify == "magnitude":
      out.append(_per_tensor(magnitude, layered)(d))
    else:  # random: torch.bernoulli(density) per entry.
      out.append(jax.random.bernoulli(k, density, d.shape).astype(jnp.float32))
  return treedef.unflatten(out)


def _rescaled(d, mask):
  """mergekit's `rescaled_masked_tensor` (L1): the kept entries scaled to the tensor's L1 norm."""
  masked = d * mask
  before, after = jnp.sum(jnp.abs(d)), jnp.sum(jnp.abs(masked))
  ok = (before >= _EPS) & (after >= _EPS)
  return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def merge_params(params_n, weights, base=None, *, method: str = "dare_ties",
                 density: float = 1.0, lam: float = 1.0, normalize: bool | None = None,
                 rescale: bool | None = None, key=None, masks=None):
  """One model's params from the stacked pool by mergekit's `method` (module docstring).
  masks: the sparsification masks to use (`sparsity_masks`' structure); None: drawn from `key`."""
  if method not in METHODS:
    raise ValueError(f"merge method must be one of {list(METHODS)}, got {method!r}")
  sparsify, consensus, normalize_default, rescale_default = METHODS[method]
  normalize = normalize_default if normalize is None else normalize
  rescale = rescale_default if rescale is None else rescale
  w = jnp.asarray(weights, jnp.float32)
  leaves, treedef = jax.tree.flatten(params_n)

  def bw(x):  # Weights broadcast against [N, ...].
    return w.reshape((-1,) + (1,) * (x.ndim - 1))

  if method == "linear":
    out = [jnp.sum(bw(x) * x.astype(jnp.float32), 0) for x in leaves]
    if normalize:
      out = [o / jnp.sum(w) for o in out]
    return treedef.unflatten([o.astype(x.dtype) for o, x in zip(out, leaves)])
  if base is None:
    raise core.StrategyError(
        f"{method} merges task vectors (member - base): give the model the members were "
        "fine-tuned from (config.merge_base; collab.fit(..., base=params)). Merging against the "
        "members' own mean makes the task vectors sum to zero.")
  base_leaves = treedef.flatten_up_to(base)
  deltas = treedef.unflatten([x.astype(jnp.float32) - b.astype(jnp.float32)[None]
                              for x, b in zip(leaves, base_leaves)])
  if masks is None:
    masks = sparsity_masks(deltas, method=method, density=density, key=key)
  mask_leaves = treedef.flatten_up_to(masks) if sparsify else [None] * len(leaves)
  out = []
  for d, b, m, layered, x in zip(jax.tree.leaves(deltas), base_leaves, mask_leaves,
                                 _layered(params_n), leaves):
    if m is not None:
      d = _per_tensor(_rescaled, layered)(d, m) if rescale else d * m
    wd = bw(d) * d
    if consensus:  # "sum": the sign of the weighted sum (>= 0: +); only agreeing entries count.
      majority = jnp.where(jnp.sum(wd, 0) >= 0, 1.0, -1.0)
      agree = (jnp.sign(wd) == majority[None]).astype(jnp.float32)
      mixed = jnp.sum(wd * agree, 0)
      divisor = jnp.sum(bw(d) * agree, 0)
      divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
      mixed = jnp.sum(wd, 0)
      divisor = jnp.sum(w)
      divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
      mixed = mixed / divisor
    out.append((b.astype(jnp.float32) + lam * mixed).astype(x.dtype))
  return treedef.unflatten(out)


def _weights(cfg: MergeConfig, state, n: int):
  if state is not None and "weights" in state:
    return state["weights"]
  if cfg.weights is not None:
    if len(cfg.weights) != n:
      raise core.StrategyError(f"{len(cfg.weights)} merge weights for a pool of {n}")
    return jnp.asarray(cfg.weights, jnp.float32)
  return jnp.full((n,), 1.0 / n, jnp.float32)


def _merged(params_n, cfg: MergeConfig, state):
  """The merge of params_n by cfg and the fitted state (weights, base)."""
  base = None if state is None else state.get("base")
  return merge_params(params_n, _weights(cfg, state, pool_lib.num_models(params_n)), base,
                      key=jax.random.key(cfg.seed), **cfg.options)


_merged_jit = jax.jit(_merged, static_argnames="cfg")


def _run(params_n, batch: core.Batch, rng, *, cfg: MergeConfig, env: core.Env, state=None):
  """Decodes the merged model. A state from `_fit` holds the merge of the params it was fitted
  on ("merged", computed once there): every batch decodes it instead of merging again. (Merging
  three 135M-parameter models took ~15 s on 2 CPU cores; merged per batch, dare_ties' 9 test
  batches of --quick took 2.5 min against 1.0 min for decoding all three singles.) The state
  belongs to the params it was fitted on, as every fitted state does."""
  merged = state["merged"] if state is not None and "merged" in state else _merged(
      params_n, cfg, state)
  out = decoding.decode(merged, batch.prompt, batch.prompt_mask, rng, sampler=env.sampler,
                        return_rows=env.return_rows, **env.decode_kw)
  return core.Output(out.tokens, out.lengths, out.rows if env.return_rows else None, {})


# -------------------------------------------------------------------------------------------------
# The reference's weight search.


class NumericSwarm:
  """The reference's particle swarm (GitHub BunsenFeng/model_collaboration,
  `model_collaboration/utils/numeric_swarm.py`), step for step: positions and velocities uniform
  in [-1, 1]; each update normalises the four coefficients (times uniform draws when
  `weight_randomness`) to sum to 1, moves v = w v + c (personal best - x) + s (global best - x) +
  r (x - global worst) and x += step v, decays the step (x0.95, floor 0.1); a particle whose
  score did not beat its previous `restart_patience - 1` scores restarts from its personal best
  with a new random velocity; `update` returns True (stop) when the global best did not improve
  over the last `patience - 1` updates. Maximises. Deviation: numpy's seeded Generator instead
  of Python's `random`. `particles` / `velocities` override the random start (tests).

  Kept as the reference has it, and measured (25 updates on -(x - 0.3)^2, 50 seeds): it finds a
  1-D optimum (median distance 0.0025), but in 3-D its 5 particles collapse early (median 0.17,
  from 0.62 at the start); a particle restarted twice at its personal best stays there, since
  scoring its best again counts as no improvement. With the reference's 5 iterations restarts
  begin only at the 4th update."""

  def __init__(self, dimension: int, population: int, *, rng: np.random.Generator,
               starting_velocity_mode: str = "random", weight_randomness: bool = True,
               inertia: float = 0.2, cognitive_coeff: float = 0.3, social_coeff: float = 0.4,
               repel_coeff: float = 0.05, step_length: float = 0.5, repel_term: bool = True,
               step_length_factor: float = 0.95, minimum_step_length: float = 0.1,
               patience: int = 5, restart_patience: int = 3, particles=None, velocities=None):
    if starting_velocity_mode not in ("random", "zero"):
      raise ValueError(f"starting_velocity_mode must be 'random' or 'zero', got "
                       f"{starting_velocity_mode!r}")
    self.dimension, self.population, self.rng = dimension, population, rng
    self.weight_randomness, self.repel_term = weight_randomness, repel_term
    self.coeffs = (inertia, cognitive_coeff, social_coeff, repel_coeff)
    self.step_length, self.step_length_factor = step_length, step_length_factor
    self.minimum_step_length = minimum_step_length
    self.patience, self.restart_patience = patience, restart_patience
    self.particles = [np.asarray(p, np.float64) for p in (
        particles if particles is not None else rng.uniform(-1, 1, (population, dimension)))]
    if velocities is None:
      velocities = (np.zeros((population, dimension)) if starting_velocity_mode == "zero"
                    else rng.uniform(-1, 1, (population, dimension)))
    self.velocities = [np.asarray(v, np.float64) for v in velocities]
    self.personal_bests = list(self.particles)
    self.best_scores: list[float | None] = [None] * population
    self.histories: list[list[float]] = [[] for _ in range(population)]
    self.global_best = self.particles[int(rng.integers(population))]
    self.global_worst = self.particles[int(rng.integers(population))]
    self.global_best_score, self.global_worst_score = -np.inf, np.inf
    self.g: float | None = None
    self.g_worst: float | None = None
    self.g_history: list[float] = []

  def update(self, scores) -> bool:
    scores = [float(s) for s in scores]
    if len(scores) != self.population:
      raise ValueError(f"{len(scores)} scores for a population of {self.population}")
    for i, s in enumerate(scores):
      self.histories[i].append(s)
      if self.best_scores[i] is None or s > self.best_scores[i]:
        self.best_scores[i] = s
        self.personal_bests[i] = self.particles[i]
    if self.g is None or max(scores) > self.g:
      self.g = self.global_best_score = max(scores)
      self.global_best = self.particles[scores.index(max(scores))]
    if self.g_worst is None or min(scores) < self.g_worst:
      self.g_worst = self.global_worst_score = min(scores)
      self.global_worst = self.particles[scores.index(min(scores))]
    self.g_history.append(self.g)
    if len(self.g_history) > self.patience:
      recent = self.g_history[-self.patience:]
      if self.g_history[-1] <= max(recent[:-1]):
        return True
    for i in range(self.population):
      history = self.histories[i]
      if len(history) > self.restart_patience:
        recent = history[-self.restart_patience:]
        if history[-1] <= max(recent[:-1]):
          self.particles[i] = self.personal_bests[i]
          self.velocities[i] = self.rng.uniform(-1, 1, self.dimension)
          continue
      r = self.rng.uniform(0, 1, 4) if self.weight_randomness else np.ones(4)
      c = np.asarray(self.coeffs) * r
      if not self.repel_term:
        c[3] = 0.0
      c = c / c.sum()
      x = self.particles[i]
      self.velocities[i] = (self.velocities[i] * c[0] + (self.personal_bests[i] - x) * c[1]
                            + (self.global_best - x) * c[2] + (x - self.global_worst) * c[3])
      self.particles[i] = x + self.velocities[i] * self.step_length
    self.step_length = max(self.step_length * self.step_length_factor, self.minimum_step_length)
    return False


def softmax(x) -> np.ndarray:
  e = np.exp(np.asarray(x, np.float64) - np.max(x))
  return e / e.sum()


def search_weights(fitness, n: int, cfg: MergeConfig):
  """The reference's "optimized" mode: each iteration scores every particle's softmax weights,
  then updates the swarm (stopping early on its signal); returns (softmax of the global best,
  its score, the best score after each iteration)."""
  swarm = NumericSwarm(n, cfg.population, rng=np.random.default_rng(cfg.seed),
                       inertia=cfg.inertia, cognitive_coeff=cfg.cognitive_coeff,
                       social_coeff=cfg.social_coeff, repel_coeff=cfg.repel_coeff,
                       repel_term=cfg.repel_term, step_length=cfg.step_length,
                       step_length_factor=cfg.step_length_factor,
                       minimum_step_length=cfg.minimum_step_length, patience=cfg.patience,
                       restart_patience=cfg.restart_patience)
  history = []
  for _ in range(cfg.iterations):
    scores = [fitness(softmax(p)) for p in swarm.particles]
    stop = swarm.update(scores)
    history.append(float(swarm.global_best_score))
    if stop:
      break
  return softmax(swarm.global_best), float(swarm.global_best_score), history


def _fit(pool, dev, cfg: MergeConfig, env: core.Env, rng, base=None):
  """State {"base", "weights"[, "search"], "merged"}: uniform weights, or the swarm's on dev
  maximising `dev.evaluate(merged params) -> mean score`; "merged": the merge with them, which
  `_run` decodes."""
  del env, rng
  if base is None and cfg.method in NEEDS_BASE:
    merge_params(pool.params, _weights(cfg, None, pool.size), None, method=cfg.method)  # Raises.
  state: dict[str, Any] = {} if base is None else {"base": base}
  if cfg.search == "uniform":
    state |= {"weights": _weights(cfg, None, pool.size)}
  else:
    if dev is None or dev.evaluate is None:
      raise core.StrategyError("merge weight search (search='pso') needs dev data with an "
                               "`evaluate(params) -> score` function")

    def fitness(w):
      return dev.evaluate(_merged_jit(pool.params, cfg, state | {"weights": jnp.asarray(
          w, jnp.float32)}))

    w, best, history = search_weights(fitness, pool.size, cfg)
    state |= {"weights": jnp.asarray(w, jnp.float32),
              "search": {"best_dev_score": best, "history": history}}
  merge_inputs = {k: state[k] for k in ("base", "weights") if k in state}
  return state | {"merged": _merged_jit(pool.params, cfg, merge_inputs)}


def _config(method: str):
  return dataclasses.make_dataclass(
      f"{''.join(p.title() for p in method.split('_'))}MergeConfig",
      [("method", str, dataclasses.field(default=method))], bases=(MergeConfig,), frozen=True,
      namespace={"__module__": __name__})


DareTiesConfig = _config("dare_ties")
TiesConfig = _config("ties")
LinearConfig = _config("linear")
TaskArithmeticConfig = _config("task_arithmetic")
for _name, _cfg in (("dare_ties", DareTiesConfig), ("ties", TiesConfig), ("linear", LinearConfig),
                    ("task_arithmetic", TaskArithmeticConfig)):
  core.register(_name, "weight", _cfg, fit=_fit, min_models=2)(_run)
