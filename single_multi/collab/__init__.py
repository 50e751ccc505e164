"""Collaboration strategies: one registry, pure functions over stacked pool params.

    from single_multi import collab
    env = collab.make_env(pool, "logit_fusion", max_new_tokens=64)
    out = collab.run(pool, "logit_fusion", batch, env=env)        # jitted, one program
    collab.REGISTRY["llm_blender"].level                            # "text"

Levels: single (one model), api (routers), text (answers exchanged in token space), logit,
token (Co-LLM), weight (merges). See core.py for the strategy contract.
"""

import functools

import jax

from single_multi.collab import merge, routers, text_level, token_level  # noqa: F401 (register)
from single_multi.collab.hetero import run_heterogeneous
from single_multi.collab.core import (REGISTRY, Batch, DevData, Env, Output, Strategy,
                                      StrategyError, batch_from, get, register)
from single_multi.collab.templates import make_env

__all__ = ["REGISTRY", "Batch", "DevData", "Env", "Output", "Strategy", "StrategyError",
           "batch_from", "check_pool", "fit", "get", "make_env", "merge", "register", "route", "routers",
           "run_heterogeneous", "run", "text_level", "token_level"]

HOMOGENEOUS_ONLY = ("logit", "token", "weight")


@functools.partial(jax.jit, static_argnames=("name", "cfg", "env"))
def _run(params_n, batch, rng, state, *, name, cfg, env):
  return get(name).run(params_n, batch, rng, cfg=cfg, env=env, state=state)


def run(pool, name: str, batch: Batch, *, env: Env, cfg=None, state=None, rng=None) -> Output:
  """Runs strategy `name` on a stacked pool as one jitted program."""
  spec = get(name)
  cfg = spec.Config() if cfg is None else cfg
  rng = jax.random.key(0) if rng is None else rng
  return _run(pool.params, batch, rng, state, name=name, cfg=cfg, env=env)


@functools.partial(jax.jit, static_argnames=("name", "cfg", "env"))
def _route(params_n, batch, rng, state, *, name, cfg, env):
  return get(name).route(params_n, batch, rng, cfg=cfg, env=env, state=state)


def route(pool, name: str, batch: Batch, *, env: Env, cfg=None, state=None, rng=None):
  """A router's choice per row ([B] int32, the member whose own answer the row gets) and its
  extras, as one jitted program that decodes no answer (strategies registered with `route`)."""
  spec = get(name)
  if spec.route is None:
    raise StrategyError(f"{name} does not route each query to one member's own answer")
  cfg = spec.Config() if cfg is None else cfg
  rng = jax.random.key(0) if rng is None else rng
  return _route(pool.params, batch, rng, state, name=name, cfg=cfg, env=env)


def fit(pool, name: str, dev: DevData | None, *, env: Env, cfg=None, rng=None, **kwargs):
  """What strategy `name` learns on the dev split (None for strategies that learn nothing)."""
  spec = get(name)
  if spec.fit is None:
    return None
  cfg = spec.Config() if cfg is None else cfg
  return spec.fit(pool, dev, cfg, env, jax.random.key(0) if rng is None else rng, **kwargs)


def check_pool(name: str, homogeneous: bool) -> None:
  """Heterogeneous pools (different tokenizers/architectures) cannot share logits or weights."""
  level = get(name).level
  if not homogeneous and level in HOMOGENEOUS_ONLY:
    raise StrategyError(
        f"{name} is a {level}-level strategy: it combines the models' {level}s, which needs one "
        "vocabulary and one architecture; this pool is heterogeneous. Use a text- or API-level "
        f"strategy ({sorted(n for n, s in REGISTRY.items() if s.level in ('text', 'api'))})")
