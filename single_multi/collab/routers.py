"""API-level strategies: pick one model per query; that model's answer is the output.

Both routers read a query as the mean of a pool member's final hidden states over its prompt
(`query_features`, standardised with dev statistics) and learn from the dev split only: each
model's dev score per query. `run` decodes every model (one vmapped program) and returns the
chosen model's answer; `extras["choice"]` holds the routing decision.

Label rule for `trained_router` (documented tie-break): a dev query's label is the model with the
highest score on it; among tied models the one with the higher mean dev score overall; then the
lower pool index. (The reference breaks ties with a reward model.)
"""

from __future__ import annotations

import dataclasses
import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from single_multi import pool as pool_lib
from single_multi.collab import core
from single_multi.models import transformer
from single_multi.models.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("config",))
def query_features(params, tokens_bt, mask_bt, *, config: ModelConfig) -> jax.Array:
  """Mean final hidden state over the real prompt tokens [B, D] (float32)."""
  hidden, _ = transformer.hidden_states(params, tokens_bt, config, mask_bt=mask_bt)
  m = mask_bt.astype(jnp.float32)[..., None]
  return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def _dev_features(pool, dev: core.DevData, router: int, chunk: int = 32) -> np.ndarray:
  params = pool.member(router)
  b = dev.batch
  return np.concatenate([np.asarray(query_features(params, b.prompt[s:s + chunk],
                                                   b.prompt_mask[s:s + chunk],
                                                   config=pool.config))
                         for s in range(0, b.prompt.shape[0], chunk)])


def best_model_labels(scores_nq: np.ndarray) -> np.ndarray:
  """Per dev query, the best model under the documented tie-break (module docstring)."""
  scores = np.asarray(scores_nq, np.float64)
  overall = scores.mean(axis=1)
  labels = []
  for column in scores.T:
    best = np.flatnonzero(column == column.max())
    labels.append(best[overall[best] == overall[best].max()][0])
  return np.asarray(labels, np.int32)


def _standardise(x, state):
  return (x - state["mean"]) / state["std"]


def _answers_routed(params_n, batch, rng, env, choice):
  out = pool_lib.decode_each(params_n, batch.prompt, batch.prompt_mask, rng, sampler=env.sampler,
                             **env.decode_kw)
  rows = jnp.arange(choice.shape[0])
  return core.Output(out.tokens[choice, rows], out.lengths[choice, rows], None,
                     {"choice": choice, "answers": out.tokens})


def _check_dev(dev: core.DevData | None, n: int, name: str):
  if dev is None or dev.scores is None:
    raise core.StrategyError(f"{name} learns from dev scores: fit it with DevData(scores=[N, Q])")
  scores = np.asarray(dev.scores)
  if scores.shape != (n, dev.batch.prompt.shape[0]):
    raise core.StrategyError(f"{name}: dev scores have shape {scores.shape}, expected "
                             f"({n}, {dev.batch.prompt.shape[0]}) (models x dev queries)")
  return scores


# -------------------------------------------------------------------------------------------------
# Trained router: a classification head on a pool member's features.


@dataclasses.dataclass(frozen=True)
class TrainedRouterConfig:
  router: int = 0  # The pool member whose hidden states encode the queries.
  hidden: int = 0  # 0: a linear head; > 0: one hidden layer of this width.
  steps: int = 300
  learning_rate: float = 1e-2
  weight_decay: float = 1e-4
  seed: int = 0


def _head_init(key, d, n, hidden):
  if hidden:
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros(hidden),
            "w": jax.random.normal(k2, (hidden, n)) / np.sqrt(hidden), "b": jnp.zeros(n)}
  return {"w": jnp.zeros((d, n)), "b": jnp.zeros(n)}


def _head_apply(head, x):
  if "w1" in head:
    x = jax.nn.gelu(x @ head["w1"] + head["b1"])
  return x @ head["w"] + head["b"]


def _fit_trained_router(pool, dev, cfg: TrainedRouterConfig, env, rng):
  del env, rng
  scores = _check_dev(dev, pool.size, "trained_router")
  labels = jnp.asarray(best_model_labels(scores))
  feats = _dev_features(pool, dev, cfg.router)
  mean, std = feats.mean(0), feats.std(0) + 1e-6
  x = jnp.asarray((feats - mean) / std)
  head = _head_init(jax.random.key(cfg.seed), x.shape[1], pool.size, cfg.hidden)
  opt = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)

  @jax.jit
  def train(head):
    def loss(h):
      return optax.softmax_cross_entropy_with_integer_labels(_head_apply(h, x), labels).mean()

    def step(carry, _):
      h, s = carry
      value, grads = jax.value_and_grad(loss)(h)
      updates, s = opt.update(grads, s, h)
      return (optax.apply_updates(h, updates), s), value

    (head, _), losses = jax.lax.scan(step, (head, opt.init(head)), None, length=cfg.steps)
    return head, losses

  head, losses = train(head)
  accuracy = float(jnp.mean(jnp.argmax(_head_apply(head, x), -1) == labels))
  return {"head": head, "mean": jnp.asarray(mean), "std": jnp.asarray(std),
          "train": {"final_loss": losses[-1], "label_accuracy": accuracy}}


@core.register("trained_router", "api", TrainedRouterConfig, fit=_fit_trained_router,
               min_models=2)
def trained_router(params_n, batch: core.Batch, rng, *, cfg: TrainedRouterConfig, env: core.Env,
                   state=None):
  """Route each query to the model a head on the router member's features predicts is best."""
  if state is None or "head" not in state:
    raise core.StrategyError("trained_router must be fitted on dev first (Strategy.fit)")
  feats = query_features(core.member(params_n, cfg.router), batch.prompt, batch.prompt_mask,
                         config=env.config)
  choice = jnp.argmax(_head_apply(state["head"], _standardise(feats, state)), -1)
  return _answers_routed(params_n, batch, rng, env, choice.astype(jnp.int32))


# -------------------------------------------------------------------------------------------------
# Graph router: a bipartite GNN over query and model nodes with dev-score edges (GraphRouter).


class GraphRouterNet(nn.Module):
  """Query nodes (features), model nodes (learned embeddings), edges (q, m) with features
  (the dev score, and the model's cost). One round of message passing each way along the known
  (message) edges, then an MLP scores every (query, model) edge."""

  num_models: int
  width: int = 64

  @nn.compact
  def __call__(self, x_qd, edge_qm2, known_qm):
    """x [Q, D]; edge features [Q, N, 2]; known [Q, N] (edges whose features are visible)."""
    mlp = lambda name: nn.Sequential([nn.Dense(self.width, name=f"{name}_0"), nn.gelu,
                                      nn.Dense(self.width, name=f"{name}_1")])
    hq = mlp("query")(x_qd)
    hm = self.param("model_embed", nn.initializers.normal(0.1), (self.num_models, self.width))
    Q = x_qd.shape[0]
    k = known_qm.astype(jnp.float32)[..., None]
    pair_q = jnp.broadcast_to(hq[:, None], (Q, self.num_models, self.width))
    pair_m = jnp.broadcast_to(hm[None], (Q, self.num_models, self.width))
    to_model = mlp("msg_model")(jnp.concatenate([pair_q, edge_qm2], -1))
    hm = hm + jnp.sum(k * to_model, 0) / jnp.maximum(jnp.sum(k, 0), 1.0)
    pair_m = jnp.broadcast_to(hm[None], (Q, self.num_models, self.width))
    to_query = mlp("msg_query")(jnp.concatenate([pair_m, edge_qm2], -1))
    hq = hq + jnp.sum(k * to_query, 1) / jnp.maximum(jnp.sum(k, 1), 1.0)
    pair_q = jnp.broadcast_to(hq[:, None], (Q, self.num_models, self.width))
    pair_m = jnp.broadcast_to(hm[None], (Q, self.num_models, self.width))
    edge = nn.Sequential([nn.Dense(self.width, name="edge_0"), nn.gelu, nn.Dense(1, name="edge_1")])
    return edge(jnp.concatenate([pair_q, pair_m], -1))[..., 0]


@dataclasses.dataclass(frozen=True)
class GraphRouterConfig:
  router: int = 0
  width: int = 64
  steps: int = 300
  learning_rate: float = 3e-3
  message_fraction: float = 0.5  # Dev queries whose edges carry messages in a training step.
  costs: tuple[float, ...] | None = None  # Per-model cost edge feature (default 0).
  seed: int = 0


def _edge_features(scores_qn, costs_n):
  return jnp.stack([scores_qn, jnp.broadcast_to(costs_n, scores_qn.shape)], -1)


def _fit_graph_router(pool, dev, cfg: GraphRouterConfig, env, rng):
  del env, rng
  scores = _check_dev(dev, pool.size, "graph_router").T.astype(np.float32)  # [Q, N]
  feats = _dev_features(pool, dev, cfg.router)
  mean, std = feats.mean(0), feats.std(0) + 1e-6
  x = jnp.asarray((feats - mean) / std)
  costs = jnp.asarray(cfg.costs or (0.0,) * pool.size, jnp.float32)
  edges = _edge_features(jnp.asarray(scores), costs)
  net = GraphRouterNet(pool.size, cfg.width)
  key = jax.random.key(cfg.seed)
  Q = x.shape[0]
  params = net.init(key, x, edges, jnp.ones((Q, pool.size), bool))
  opt = optax.adam(cfg.learning_rate)
  target = jnp.asarray(scores)

  @jax.jit
  def train(params, key):
    def step(carry, key):
      p, s = carry
      known = jax.random.bernoulli(key, cfg.message_fraction, (Q, 1))  # Whole queries hidden.

      def loss(p):
        logits = net.apply(p, x, jnp.where(known[..., None], edges, 0.0),
                           jnp.broadcast_to(known, (Q, pool.size)))
        bce = optax.sigmoid_binary_cross_entropy(logits, target)
        w = (~known).astype(jnp.float32)  # Score only the hidden queries' edges.
        return jnp.sum(bce * w) / jnp.maximum(jnp.sum(w) * pool.size, 1.0)

      value, grads = jax.value_and_grad(loss)(p)
      updates, s = opt.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), value

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                       jax.random.split(key, cfg.steps))
    return params, losses

  params, losses = train(params, jax.random.fold_in(key, 1))
  return {"gnn": params, "mean": jnp.asarray(mean), "std": jnp.asarray(std), "dev_x": x,
          "dev_edges": edges, "train": {"final_loss": losses[-1]}}


@core.register("graph_router", "api", GraphRouterConfig, fit=_fit_graph_router, min_models=2)
def graph_router(params_n, batch: core.Batch, rng, *, cfg: GraphRouterConfig, env: core.Env,
                 state=None):
  """Route each query to the model with the highest predicted edge score; the test queries join
  the dev graph as nodes without visible edges."""
  if state is None or "gnn" not in state:
    raise core.StrategyError("graph_router must be fitted on dev first (Strategy.fit)")
  n = core.num_models(params_n)
  feats = query_features(core.member(params_n, cfg.router), batch.prompt, batch.prompt_mask,
                         config=env.config)
  x = jnp.concatenate([state["dev_x"], _standardise(feats, state)])
  B, Qd = feats.shape[0], state["dev_x"].shape[0]
  edges = jnp.concatenate([state["dev_edges"], jnp.zeros((B, n, 2), jnp.float32)])
  known = jnp.concatenate([jnp.ones((Qd, n), bool), jnp.zeros((B, n), bool)])
  logits = GraphRouterNet(n, cfg.width).apply(state["gnn"], x, edges, known)[Qd:]
  choice = jnp.argmax(logits, -1).astype(jnp.int32)
  out = _answers_routed(params_n, batch, rng, env, choice)
  return out.replace(extras=out.extras | {"edge_scores": logits})

