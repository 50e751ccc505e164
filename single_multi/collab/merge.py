"""Weight-level collaboration: merge the pool into one model, then decode with it.

Methods (task vectors d_i = theta_i - base, weights w_i):
  linear           sum_i w_i theta_i / sum_i w_i
  task_arithmetic  base + lam * sum_i w_i d_i
  ties             TIES-merging (Yadav et al. 2023): keep each d_i's top `density` fraction by
                   magnitude (per tensor), elect each coordinate's sign by the weighted sum, average
                   the agreeing entries (weighted); base + lam * merged
  dare             DARE (Yu et al. 2024): drop each entry of d_i with probability 1 - density,
                   rescale the rest by 1 / density, then task arithmetic
  dare_ties        DARE's drop-and-rescale, then TIES' sign election and disjoint mean

The base: state["base"] (e.g. the instruct model the experts were tuned from); without one, the
members' elementwise mean. Weights: uniform, or searched on dev by particle swarm (population 5,
5 iterations, the reference's setting) maximising a dev score (`fit`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from single_multi import decoding
from single_multi.collab import core

METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_ties")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  method: str = "dare_ties"
  weights: tuple[float, ...] | None = None  # None: uniform, or the searched ones (`fit`).
  density: float = 0.5  # TIES: fraction kept by magnitude; DARE: keep probability.
  lam: float = 1.0  # Scale of the merged task vector.
  search: str = "uniform"  # "uniform" or "pso" (weights searched on dev in `fit`).
  population: int = 5
  iterations: int = 5
  seed: int = 0  # DARE's drop masks.

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"merge method must be one of {METHODS}, got {self.method!r}")
    if not 0 < self.density <= 1:
      raise ValueError(f"density must be in (0, 1], got {self.density}")
    if self.search not in ("uniform", "pso"):
      raise ValueError(f"merge search must be 'uniform' or 'pso', got {self.search!r}")


def _trim(d, density: float):
  """Zero all but the top `density` fraction of |d| (per tensor; ties at the threshold kept)."""
  flat = jnp.abs(d).reshape(-1)
  k = max(1, math.ceil(density * flat.size))
  if k >= flat.size:
    return d
  threshold = jax.lax.top_k(flat, k)[0][-1]
  return jnp.where(jnp.abs(d) >= threshold, d, 0)


def _dare(d, density: float, key):
  if density >= 1.0:
    return d
  keep = jax.random.bernoulli(key, density, d.shape)
  return jnp.where(keep, d / density, 0).astype(d.dtype)


def _elect_and_merge(d_n, w_n):
  w = w_n.reshape((-1,) + (1,) * (d_n.ndim - 1)).astype(jnp.float32)
  d = d_n.astype(jnp.float32)
  sign = jnp.sign(jnp.sum(w * d, axis=0))
  agree = (jnp.sign(d) == sign[None]) & (d != 0)
  num = jnp.sum(jnp.where(agree, w * d, 0), axis=0)
  den = jnp.sum(jnp.where(agree, w, 0), axis=0)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0)


def merge_params(params_n, weights, base=None, *, method: str = "dare_ties",
                 density: float = 0.5, lam: float = 1.0, key=None):
  """One model's params from the stacked pool (see the module docstring)."""
  if method not in METHODS:
    raise ValueError(f"merge method must be one of {METHODS}, got {method!r}")
  w = jnp.asarray(weights, jnp.float32)
  if base is None:
    base = jax.tree.map(lambda x: jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype),
                        params_n)
  leaves, treedef = jax.tree.flatten(params_n)
  base_leaves = treedef.flatten_up_to(base)
  keys = (jax.random.split(key if key is not None else jax.random.key(0), len(leaves))
          if method.startswith("dare") else [None] * len(leaves))
  out = []
  for x, b, k in zip(leaves, base_leaves, keys):
    if method == "linear":
      wx = w.reshape((-1,) + (1,) * (x.ndim - 1))
      out.append((jnp.sum(wx * x.astype(jnp.float32), 0) / jnp.sum(w)).astype(x.dtype))
      continue
    d = x.astype(jnp.float32) - b.astype(jnp.float32)[None]
    if method == "ties":
      d = jax.vmap(lambda t: _trim(t, density))(d)
    elif method.startswith("dare"):
      d = jax.vmap(lambda t, kk: _dare(t, density, kk))(d, jax.random.split(k, d.shape[0]))
    if method in ("ties", "dare_ties"):
      merged = _elect_and_merge(d, w)
    else:
      merged = jnp.tensordot(w, d, axes=1)
    out.append((b.astype(jnp.float32) + lam * merged).astype(x.dtype))
  return treedef.unflatten(out)


def _weights(cfg: MergeConfig, state, n: int):
  if state is not None and "weights" in state:
    return state["weights"]
  if cfg.weights is not None:
    if len(cfg.weights) != n:
      raise core.StrategyError(f"{len(cfg.weights)} merge weights for a pool of {n}")
    return jnp.asarray(cfg.weights, jnp.float32)
  return jnp.full((n,), 1.0 / n, jnp.float32)


def _run(params_n, batch: core.Batch, rng, *, cfg: MergeConfig, env: core.Env, state=None):
  n = core.num_models(params_n)
  merged = merge_params(params_n, _weights(cfg, state, n), None if state is None
                        else state.get("base"), method=cfg.method, density=cfg.density,
                        lam=cfg.lam, key=jax.random.key(cfg.seed))
  out = decoding.decode(merged, batch.prompt, batch.prompt_mask, rng, sampler=env.sampler,
                        return_rows=env.return_rows, **env.decode_kw)
  return core.Output(out.tokens, out.lengths, out.rows if env.return_rows else None, {})


def particle_swarm(fitness, dim: int, *, population: int = 5, iterations: int = 5, seed: int = 0,
                   inertia: float = 0.7, c_self: float = 1.5, c_swarm: float = 1.5):
  """Maximise fitness(w) over w in [0, 1]^dim (the reference's PSO: population 5, 5 iterations).
  The uniform point is always among the first particles. Returns (best w, best fitness, history)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (population, dim))
  x[0] = 1.0 / dim
  v = rng.uniform(-0.1, 0.1, (population, dim))
  f = np.array([fitness(p) for p in x])
  best_x, best_f = x.copy(), f.copy()
  g = int(np.argmax(f))
  history = [float(f.max())]
  for _ in range(iterations):
    r1, r2 = rng.uniform(size=(2, population, dim))
    v = inertia * v + c_self * r1 * (best_x - x) + c_swarm * r2 * (best_x[g] - x)
    x = np.clip(x + v, 0.0, 1.0)
    f = np.array([fitness(p) for p in x])
    better = f > best_f
    best_x[better], best_f[better] = x[better], f[better]
    g = int(np.argmax(best_f))
    history.append(float(best_f[g]))
  return best_x[g], float(best_f[g]), history


def _fit(pool, dev, cfg: MergeConfig, env: core.Env, rng, base=None):
  """Weights: uniform, or PSO on dev maximising `dev.evaluate(merged params) -> mean score`."""
  del env, rng
  state: dict[str, Any] = {} if base is None else {"base": base}
  if cfg.search == "uniform":
    return state | {"weights": _weights(cfg, None, pool.size)}
  if dev is None or dev.evaluate is None:
    raise core.StrategyError("merge weight search (search='pso') needs dev data with an "
                             "`evaluate(params) -> score` function")
  merge = jax.jit(lambda p, w, b: merge_params(p, w, b, method=cfg.method, density=cfg.density,
                                               lam=cfg.lam, key=jax.random.key(cfg.seed)))

  def fitness(w):
    w = np.maximum(w, 1e-6)
    return dev.evaluate(merge(pool.params, jnp.asarray(w / w.sum(), jnp.float32), base))

  w, best, history = particle_swarm(fitness, pool.size, population=cfg.population,
                                    iterations=cfg.iterations, seed=cfg.seed)
  w = np.maximum(w, 1e-6)
  return state | {"weights": jnp.asarray(w / w.sum(), jnp.float32),
                  "search": {"best_dev_score": best, "history": history}}


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
