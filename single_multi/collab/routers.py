"""API-level strategies: pick one model per query; that model's answer is the output.

Routers learn from the dev split only: each model's dev score per query. `run` decodes every
model (one vmapped program) and returns the chosen model's answer; `extras["choice"]` holds the
routing decision.

`trained_router`, kind "lm" (default): the reference's router (GitHub BunsenFeng/
model_collaboration, model_collaboration/method/api_trained_router.py): a language model is
fine-tuned (LoRA r=64, alpha 16, dropout 0.1 on q/k/v/o; lr 1e-5 cosine, 10% warmup; 5 epochs;
32 rows per step as 1 x 32 accumulation) on "Model k" completions of the router prompt
(templates.py), k the dev query's best model; at test time it answers the prompt and the query
goes to the highest k whose digit its reply contains (none: a random model). Deviations: the
router is a pool member (`router`; the reference fine-tunes a separate Qwen2.5-7B-Instruct); its
reply is at most `choice_tokens` tokens; pools of at most 9 models (a one-digit k).
Kind "head": a fast alternative: a linear head on the router member's mean final hidden state
over the prompt (`query_features`, standardised with dev statistics), trained by softmax
cross-entropy (AdamW, `steps` full-batch steps) plus `l2`/2 times the squared norm of its weights
(not the bias). Off by default; with ~100 fit rows and 576 features an unpenalised head fits each
row's noise: on the quickstart's validation runs (configs/quickstart.py) l2=1 routed whole
families to their member where l2=0 sent half of one family elsewhere.

`graph_router`, kind "reference" (default): the reference's GraphRouter (.../method/
api_graph_routing.py): `ReferenceGraphNet` (two GeneralConv layers of width 2 x 8 with BatchNorm
over query, task and model features, edges [score, cost 1, score]) trained as the reference
trains it (`_fit_reference_graph`: 500 epochs of 32 random edge masks, AdamW 1e-4, weight decay
1e-4, the params of the best validation macro F1 kept) and routing a batch as the reference
routes its test set (`test_graph`). Deviations: no sentence encoder is configured, so the router
member's mean final hidden state over a prompt (L2-normalised, as all-MiniLM-L6-v2's embeddings
are) stands in for the query embedding, its mean over the dev queries for the task description's,
and each member's mean over the dev queries for its model description's (the reference requires
descriptions); the dev queries are split 80/10/10 in a seeded order (the reference: file order);
a batch is one test graph (the reference: the whole test set); flax's BatchNorm updates its
running variance with the biased estimate (torch: unbiased). Kind "fast": our bipartite GNN
(`GraphRouterNet`), the test queries joining the dev graph.

Label rule of `trained_router` (both kinds): a dev query's label is the model with the highest score on it; among
tied models the one with the higher mean dev score overall; then the lower pool index. (The
reference breaks ties with a reward model's score of the answers; without one this rule stands
in.) Deviation, off by default (`labels="tied"`, kind "head"): the head's target is spread evenly
over every model with the query's top score, so a tie names no winner. With exact-match scores
most ties are between several right answers; the tie-break then hands every such row to the
model best overall, and a router fitted on the labels learns that model's overall rank rather
than which model is right on which kind of query.
"""

from __future__ import annotations

import dataclasses
import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from single_multi import decoding, distill, pool as pool_lib
from single_multi import train as train_lib
from single_multi.collab import core, text_level
from single_multi.models import lora as lora_lib, transformer
from single_multi.models.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("config",))
def query_features(params, tokens_bt, mask_bt, *, config: ModelConfig, prefix_p=None) -> jax.Array:
  """Mean final hidden state over the real prompt tokens [B, D] (float32). prefix_p: a head [Pp]
  every prompt starts with, tokens_bt then holding only each prompt's rest: the head runs once
  and the rows attend to its cached keys, at the whole prompts' positions (as `pool.decode_each`
  prefills it), its hidden states counted in every row's mean."""
  m = mask_bt.astype(jnp.float32)[..., None]
  if prefix_p is None:
    hidden, _ = transformer.hidden_states(params, tokens_bt, config, mask_bt=mask_bt)
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  (B, P), Pp = tokens_bt.shape, prefix_p.shape[0]
  cache = transformer.init_cache(config, 1, Pp + P, params["embed"].dtype)
  head, cache = transformer.hidden_states(params, prefix_p[None], config, cache=cache)
  cache = transformer.broadcast_rows(cache, B)
  hidden, _ = transformer.hidden_states(params, tokens_bt, config, mask_bt=mask_bt, cache=cache)
  total = jnp.sum(head.astype(jnp.float32), axis=1) + jnp.sum(hidden.astype(jnp.float32) * m,
                                                                axis=1)
  return total / (Pp + jnp.sum(m, axis=1))


def batch_features(params, batch: core.Batch, config: ModelConfig) -> jax.Array:
  """`query_features` of a batch's prompts, their shared head run once when the batch has it."""
  if batch.prefix is not None:
    return query_features(params, batch.rest, batch.rest_mask, config=config,
                          prefix_p=batch.prefix)
  return query_features(params, batch.prompt, batch.prompt_mask, config=config)


def _dev_features(pool, dev: core.DevData, router: int, chunk: int = 32) -> np.ndarray:
  params = pool.member(router)
  b = dev.batch
  return np.concatenate([np.asarray(query_features(params, b.prompt[s:s + chunk],
                                                   b.prompt_mask[s:s + chunk],
                                                   config=pool.config))
                         for s in range(0, b.prompt.shape[0], chunk)])


def tied_best_targets(scores_nq: np.ndarray) -> np.ndarray:
  """Per dev query, a distribution [Q, N] spread evenly over the models with its top score."""
  scores = np.asarray(scores_nq, np.float64).T
  best = scores == scores.max(axis=1, keepdims=True)
  return (best / best.sum(axis=1, keepdims=True)).astype(np.float32)


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
  kind: str = "lm"  # "lm": the reference's LM router; "head": a head on hidden states (fast).
  router: int = 0  # The pool member that routes (its LoRA fine-tune, or its hidden states).
  # kind "lm" (the reference's SFT of the router).
  lora_rank: int = 64
  lora_alpha: float = 16.0
  lora_dropout: float = 0.1
  lm_learning_rate: float = 1e-5
  epochs: int = 5
  rows_per_step: int = 32  # The reference: batch 1 x 32 accumulation.
  micro_batch: int = 1
  choice_tokens: int = 8  # The router's reply budget.
  # kind "head".
  # "best": one model per dev query (the reference's rule, ties as documented above); "tied":
  # the target spread evenly over the query's tied best models (a deviation, see above).
  labels: str = "best"
  hidden: int = 0  # 0: a linear head; > 0: one hidden layer of this width.
  steps: int = 300
  learning_rate: float = 1e-2
  weight_decay: float = 1e-4  # AdamW's decoupled decay (x learning rate per step).
  l2: float = 0.0  # The penalty l2/2 * |w|^2 added to the head's loss (kind "head").
  seed: int = 0

  def __post_init__(self):
    if self.kind not in ("lm", "head"):
      raise ValueError(f"trained_router kind must be 'lm' or 'head', got {self.kind!r}")
    if self.labels not in ("best", "tied"):
      raise ValueError(f"trained_router labels must be 'best' or 'tied', got {self.labels!r}")
    if not self.l2 >= 0:
      raise ValueError(f"trained_router l2 must be >= 0, got {self.l2}")
    if self.labels == "tied" and self.kind != "head":
      raise ValueError("trained_router labels='tied' needs kind 'head' (the LM router is "
                       "fine-tuned to name one model)")

  @property
  def lora(self) -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha,
                               dropout=self.lora_dropout, targets=("q", "k", "v", "o"))


def router_prompts(batch: core.Batch, env: core.Env):
  """The router prompt of every query (tokens, mask), packed in token space."""
  return text_level.fill(env, "router", text_level._question(batch), [])


def digit_table(tokenizer, vocab_size: int, n: int) -> np.ndarray:
  """[n, V] bool: token v's text contains the digit k + 1 (the reference's `str(k + 1) in reply`,
  token by token: a one-digit k never spans two tokens)."""
  if n > 9:
    raise core.StrategyError(f"the LM router names models 1-9; the pool has {n}")
  size = min(len(tokenizer), vocab_size) if hasattr(tokenizer, "__len__") else vocab_size
  ids = [[i] for i in range(size)]
  texts = (tokenizer.batch_decode(ids) if hasattr(tokenizer, "batch_decode")
           else [tokenizer.decode(i) for i in ids])
  table = np.zeros((n, vocab_size), bool)
  for k in range(n):
    table[k, :size] = [str(k + 1) in t for t in texts]
  return table


def _fit_lm_router(pool, dev, cfg: TrainedRouterConfig, env, labels):
  """SFT of the router member's LoRA on (router prompt, "Model k" + end of turn)."""
  tokens, mask = router_prompts(dev.batch, env)
  eos = env.stop_ids[0]
  completions = [pool.tokenizer(f"Model {k + 1}", add_special_tokens=False)["input_ids"] + [eos]
                 for k in labels]
  width = max(map(len, completions))
  comp = np.asarray([c + [0] * (width - len(c)) for c in completions], np.int32)
  rows = distill.sequences(tokens, mask, jnp.asarray(comp),
                           jnp.asarray([len(c) for c in completions], jnp.int32))
  q = len(labels)
  per_step = min(cfg.rows_per_step, q)
  micro = max(1, min(cfg.micro_batch, per_step))
  steps = cfg.epochs * -(-q // per_step)
  optim = train_lib.OptimConfig(learning_rate=cfg.lm_learning_rate, schedule="cosine",
                                warmup_fraction=0.1, accumulation=max(1, per_step // micro))
  lora, history = train_lib.finetune(
      pool.member(cfg.router), *(np.asarray(x) for x in rows), pool.config, optim=optim,
      steps=steps, batch_size=micro, lora=cfg.lora, seed=cfg.seed, progress=False,
      desc="lm router", merge_lora=False)
  return {"lora": lora,
          "digits": jnp.asarray(digit_table(pool.tokenizer, pool.config.vocab_size, pool.size)),
          "train": {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
                    "steps": steps, "label_counts": np.bincount(labels, minlength=pool.size)}}


def lm_router_choice(params_n, batch: core.Batch, rng, cfg: TrainedRouterConfig, env: core.Env,
                     state):
  """The LM router's choice per query [B] and its replies: the highest k whose digit the reply
  contains; none: a random model (the reference's parse)."""
  router = lora_lib.merge(core.member(params_n, cfg.router), state["lora"], cfg.lora)
  tokens, mask = router_prompts(batch, env)
  k_reply, k_random = decoding.split_keys(rng)
  reply = decoding.decode(router, tokens, mask, k_reply, sampler=env.sampler, config=env.config,
                          max_new_tokens=cfg.choice_tokens, stop_ids=env.stop_ids,
                          pad_id=env.pad_id)
  return named_model(reply.tokens, reply.lengths, state["digits"], k_random), reply.tokens


def named_model(tokens_bm, lengths_b, digits_nv, rng) -> jax.Array:
  """The reference's parse of router replies: for k from n down to 1, the first k whose digit
  the reply contains; none: a random model. Returns [B] int32."""
  n = digits_nv.shape[0]
  live = jnp.arange(tokens_bm.shape[1])[None] < lengths_b[:, None]
  named = jnp.any(digits_nv[:, tokens_bm] & live[None], axis=-1)  # [N, B]
  highest = n - 1 - jnp.argmax(named[::-1], axis=0)
  draw = lambda key: jax.random.randint(key, (), 0, n)
  random = (jax.vmap(draw)(rng) if rng.ndim else jax.random.randint(rng, highest.shape, 0, n))
  return jnp.where(jnp.any(named, 0), highest, random).astype(jnp.int32)


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
  del rng
  scores = _check_dev(dev, pool.size, "trained_router")
  labels = best_model_labels(scores)
  if cfg.kind == "lm":
    return _fit_lm_router(pool, dev, cfg, env, labels)
  tied = tied_best_targets(scores)
  one_hot = np.eye(pool.size, dtype=np.float32)[labels]
  targets = jnp.asarray(tied if cfg.labels == "tied" else one_hot)
  feats = _dev_features(pool, dev, cfg.router)
  mean, std = feats.mean(0), feats.std(0) + 1e-6
  x = jnp.asarray((feats - mean) / std)
  head = _head_init(jax.random.key(cfg.seed), x.shape[1], pool.size, cfg.hidden)
  opt = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)

  @jax.jit
  def train(head):
    def loss(h):
      penalty = 0.5 * cfg.l2 * sum(jnp.sum(h[k] ** 2) for k in ("w", "w1") if k in h)
      return optax.softmax_cross_entropy(_head_apply(h, x), targets).mean() + penalty

    def step(carry, _):
      h, s = carry
      value, grads = jax.value_and_grad(loss)(h)
      updates, s = opt.update(grads, s, h)
      return (optax.apply_updates(h, updates), s), value

    (head, _), losses = jax.lax.scan(step, (head, opt.init(head)), None, length=cfg.steps)
    return head, losses

  head, losses = train(head)
  chosen = np.asarray(jnp.argmax(_head_apply(head, x), -1))
  return {"head": head, "mean": jnp.asarray(mean), "std": jnp.asarray(std),
          "train": {"final_loss": losses[-1], "label_accuracy": float(np.mean(chosen == labels)),
                    # The dev queries routed to a model with their top score (any of the tied).
                    "top_score_accuracy": float(np.mean(tied[np.arange(len(labels)), chosen] > 0))}}


def trained_router_route(params_n, batch: core.Batch, rng, *, cfg: TrainedRouterConfig,
                         env: core.Env, state=None):
  """The member each query goes to [B] (kind "lm": the fine-tuned router's reply, kept in the
  extras; "head": a head on the router member's features)."""
  key = "lora" if cfg.kind == "lm" else "head"
  if state is None or key not in state:
    raise core.StrategyError(f"trained_router (kind {cfg.kind!r}) must be fitted on dev first "
                             "(Strategy.fit)")
  if cfg.kind == "lm":
    choice, reply = lm_router_choice(params_n, batch, rng, cfg, env, state)
    return choice, {"router_reply": reply}
  feats = batch_features(core.member(params_n, cfg.router), batch, env.config)
  return route_choice("trained_router", state, cfg, feats), {}


@core.register("trained_router", "api", TrainedRouterConfig, fit=_fit_trained_router,
               min_models=2, templates=("router",), route=trained_router_route)
def trained_router(params_n, batch: core.Batch, rng, *, cfg: TrainedRouterConfig, env: core.Env,
                   state=None):
  """Route each query to the model the router names (kind "lm": the fine-tuned router's reply;
  "head": a head on the router member's features)."""
  rng, k_route = decoding.split_keys(rng)
  choice, extras = trained_router_route(params_n, batch, k_route, cfg=cfg, env=env, state=state)
  out = _answers_routed(params_n, batch, rng, env, choice)
  return out.replace(extras=out.extras | extras)


# -------------------------------------------------------------------------------------------------
# Graph router.


class GeneralConv(nn.Module):
  """torch_geometric's GeneralConv at its defaults (directed messages, add aggregation, one head,
  no attention; in = out channels, so the self term is the identity): x_i + sum over visible
  edges j -> i of (W_msg x_j + b_msg + W_edge e_ji + b_edge)."""

  channels: int

  @nn.compact
  def __call__(self, x, src, dst, edge_attr, visible):
    msg = nn.Dense(self.channels, name="lin_msg")(x[src]) + nn.Dense(
        self.channels, name="lin_edge")(edge_attr)
    msg = jnp.where(visible[:, None], msg, 0.0)
    return x + jnp.zeros_like(x).at[dst].add(msg)


class ReferenceGraphNet(nn.Module):
  """The reference's EncoderDecoderNet (GitHub BunsenFeng/model_collaboration,
  model_collaboration/method/api_graph_routing.py): task and query features -> `hidden` each
  (concatenated), model features -> 2 `hidden`; edge features through a ReLU'd Linear(3, 3); two
  GeneralConv layers with BatchNorm (ReLU between); an edge (query q, model m) scores
  sigmoid(mean(x_initial[q] * x[m])). Edges run from queries to models only."""

  hidden: int = 8

  @nn.compact
  def __call__(self, task, query, llm, src, dst, edges, visible, train: bool):
    x0 = jnp.concatenate([
        jnp.concatenate([nn.Dense(self.hidden, name="task_transform")(task),
                         nn.Dense(self.hidden, name="query_transform")(query)], 1),
        nn.Dense(2 * self.hidden, name="llm_transform")(llm)], 0)
    e = jax.nn.relu(nn.Dense(edges.shape[-1], name="edge_mlp")(edges))
    # torch BatchNorm1d: momentum 0.1 (flax 0.9), eps 1e-5.
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                   name=name)
    x = jax.nn.relu(bn("bn1")(GeneralConv(2 * self.hidden, name="conv1")(x0, src, dst, e,
                                                                         visible)))
    x = bn("bn2")(GeneralConv(2 * self.hidden, name="conv2")(x, src, dst, e, visible))
    return jax.nn.sigmoid(jnp.mean(x0[src] * x[dst], -1))


def _graph(q: int, n: int):
  """Edges query b -> model i in the reference's order (b major): src, dst node ids [Q * N]."""
  src = np.repeat(np.arange(q), n)
  return jnp.asarray(src), jnp.asarray(q + np.tile(np.arange(n), q))


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
  """sklearn's f1_score(average="macro"): the mean F1 over the classes in either array."""
  f1s = []
  for c in np.union1d(labels, predicted):
    tp = np.sum((predicted == c) & (labels == c))
    fp, fn = np.sum((predicted == c) & (labels != c)), np.sum((predicted != c) & (labels == c))
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return float(np.mean(f1s))


@dataclasses.dataclass(frozen=True)
class GraphRouterConfig:
  kind: str = "reference"  # "reference": the reference's GNN and protocol; "fast": ours.
  router: int = 0  # The pool member whose hidden states stand in for the sentence encoder.
  seed: int = 0
  # kind "reference" (api_graph_routing.py's defaults).
  hidden_features: int = 8
  epochs: int = 500
  masks_per_epoch: int = 32  # The reference's `batch_size`: random edge masks per step.
  train_mask_rate: float = 0.5
  reference_learning_rate: float = 1e-4
  reference_weight_decay: float = 1e-4
  split: tuple[float, float] = (0.8, 0.1)  # Dev queries for training, validation (rest unused).
  # How test queries are routed: "reference" (a new graph of the batch's queries, every edge
  # visible with dummy features (1, 1, 1), as the reference routes its test set) or "dev" (they
  # join the training graph with their own edges hidden, as the validation queries that
  # selected the params were routed; a query's choice then depends on no other query).
  test_graph: str = "reference"
  # kind "fast".
  width: int = 64
  steps: int = 300
  learning_rate: float = 3e-3
  message_fraction: float = 0.5  # Dev queries whose edges carry messages in a training step.
  costs: tuple[float, ...] | None = None  # Per-model cost edge feature (default 0).

  def __post_init__(self):
    if self.kind not in ("reference", "fast"):
      raise ValueError(f"graph_router kind must be 'reference' or 'fast', got {self.kind!r}")
    if self.test_graph not in ("dev", "reference"):
      raise ValueError(f"graph_router test_graph must be 'dev' or 'reference', got "
                       f"{self.test_graph!r}")


def _member_features(pool, dev: core.DevData, chunk: int = 32) -> np.ndarray:
  """Each member's mean query feature over the dev prompts [N, D] (the model-description
  stand-in)."""
  b = dev.batch
  return np.stack([np.concatenate([np.asarray(query_features(
      pool.member(i), b.prompt[s:s + chunk], b.prompt_mask[s:s + chunk], config=pool.config))
      for s in range(0, b.prompt.shape[0], chunk)]).mean(0) for i in range(pool.size)])


def _fit_reference_graph(pool, dev, cfg: GraphRouterConfig):
  """The reference's protocol: one-hot best-model edge labels (argmax of the dev score, ties to
  the lower index); training edges: the first 80% of the dev queries (seeded order), each epoch
  `masks_per_epoch` random masks hiding each training edge with probability 0.5 (hidden edges
  are predicted, the rest carry messages), the mean BCE, one AdamW step; after each epoch the
  validation queries (the next 10%) are routed with the training edges visible and the params
  with the best macro F1 kept."""
  scores = _check_dev(dev, pool.size, "graph_router").T.astype(np.float32)  # [Q, N]
  q, n = scores.shape
  query = _unit(jnp.asarray(_dev_features(pool, dev, cfg.router)))
  llm = _unit(jnp.asarray(_member_features(pool, dev)))
  task = jnp.broadcast_to(_unit(jnp.mean(query, 0)), query.shape)
  effect = scores.reshape(-1)
  edges = jnp.asarray(np.stack([effect, np.ones_like(effect), effect], -1))  # [effect, cost, effect]
  labels = np.zeros((q, n), np.float32)
  labels[np.arange(q), np.argmax(scores, 1)] = 1.0
  labels = jnp.asarray(labels.reshape(-1))
  perm = np.random.default_rng(cfg.seed).permutation(q)
  n_train, n_val = int(q * cfg.split[0]), int(q * cfg.split[1])
  role = np.zeros(q, np.int32)  # 0 train, 1 validation, 2 unused.
  role[perm[n_train:n_train + n_val]] = 1
  role[perm[n_train + n_val:]] = 2
  train_edges = jnp.asarray(np.repeat(role == 0, n))
  val_rows = np.flatnonzero(role == 1)
  src, dst = _graph(q, n)
  net = ReferenceGraphNet(cfg.hidden_features)
  key = jax.random.key(cfg.seed)
  variables = net.init(key, task, query, llm, src, dst, edges, train_edges, train=False)
  params, stats = variables["params"], variables["batch_stats"]
  opt = optax.adamw(cfg.reference_learning_rate, weight_decay=cfg.reference_weight_decay)

  @jax.jit
  def epoch(params, stats, opt_state, key):
    def one(carry, key):
      stats, grads, total = carry
      hide = train_edges & (jax.random.uniform(key, train_edges.shape) < cfg.train_mask_rate)

      def loss(p):
        probs, new = net.apply({"params": p, "batch_stats": stats}, task, query, llm, src, dst,
                               edges, train_edges & ~hide, train=True, mutable=["batch_stats"])
        w = hide.astype(jnp.float32)  # torch BCELoss over the hidden edges (log clamped at -100).
        losses = -(labels * jnp.maximum(jnp.log(probs), -100)
                   + (1 - labels) * jnp.maximum(jnp.log1p(-probs), -100))
        return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0), new["batch_stats"]

      (value, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
      return (stats, jax.tree.map(jnp.add, grads, g), total + value), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (stats, grads, total), _ = jax.lax.scan(one, (stats, zeros, 0.0),
                                            jax.random.split(key, cfg.masks_per_epoch))
    grads = jax.tree.map(lambda g: g / cfg.masks_per_epoch, grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    probs = net.apply({"params": params, "batch_stats": stats}, task, query, llm, src, dst, edges,
                      train_edges, train=False)
    return params, stats, opt_state, probs.reshape(q, n), total / cfg.masks_per_epoch

  opt_state = opt.init(params)
  best, best_f1, losses = (params, stats), -1.0, []
  truth = np.argmax(scores[val_rows], 1)
  for k in jax.random.split(jax.random.fold_in(key, 1), cfg.epochs):
    params, stats, opt_state, probs, value = epoch(params, stats, opt_state, k)
    losses.append(float(value))
    if len(val_rows):
      f1 = macro_f1(truth, np.argmax(np.asarray(probs)[val_rows], 1))
      if f1 > best_f1:
        best, best_f1 = (params, stats), f1
  if not len(val_rows):
    best = (params, stats)
  return {"gnn": best[0], "batch_stats": best[1], "llm": llm, "task": task[0],
          "dev_query": query, "dev_edges": edges, "dev_visible": train_edges,
          "train": {"first_loss": losses[0], "final_loss": losses[-1],
                    "best_validation_f1": best_f1, "validation_queries": len(val_rows)}}


def reference_graph_choice(state, feats, cfg: GraphRouterConfig) -> jax.Array:
  """Each query to the model with the highest edge score [B] int32. test_graph "reference": the
  queries form a new graph with the model nodes, every edge visible with dummy features
  (1, 1, 1); "dev": they join the dev graph, whose training edges carry the messages, their own
  edges hidden (then a query's choice depends on no other test query)."""
  query = _unit(feats)
  b, n = query.shape[0], state["llm"].shape[0]
  edges, visible = jnp.ones((b * n, 3), jnp.float32), jnp.ones((b * n,), bool)
  if cfg.test_graph == "dev":
    query = jnp.concatenate([state["dev_query"], query])
    edges = jnp.concatenate([state["dev_edges"], edges])
    visible = jnp.concatenate([state["dev_visible"], jnp.zeros((b * n,), bool)])
  src, dst = _graph(query.shape[0], n)
  probs = ReferenceGraphNet(cfg.hidden_features).apply(
      {"params": state["gnn"], "batch_stats": state["batch_stats"]},
      jnp.broadcast_to(state["task"], query.shape), query, state["llm"], src, dst, edges,
      visible, train=False)
  return jnp.argmax(probs.reshape(-1, n)[-b:], -1).astype(jnp.int32)


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


def _edge_features(scores_qn, costs_n):
  return jnp.stack([scores_qn, jnp.broadcast_to(costs_n, scores_qn.shape)], -1)


def _fit_graph_router(pool, dev, cfg: GraphRouterConfig, env, rng):
  del env, rng
  if cfg.kind == "reference":
    return _fit_reference_graph(pool, dev, cfg)
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


def fast_graph_choice(state, feats, cfg: GraphRouterConfig) -> jax.Array:
  """Kind "fast": the queries join the dev graph as nodes without visible edges; each goes to the
  model with the highest predicted edge score. Returns (choice [B] int32, edge scores [B, N])."""
  n, qd = state["dev_edges"].shape[1], state["dev_x"].shape[0]
  b = feats.shape[0]
  x = jnp.concatenate([state["dev_x"], _standardise(feats, state)])
  edges = jnp.concatenate([state["dev_edges"], jnp.zeros((b, n, 2), jnp.float32)])
  known = jnp.concatenate([jnp.ones((qd, n), bool), jnp.zeros((b, n), bool)])
  logits = GraphRouterNet(n, cfg.width).apply(state["gnn"], x, edges, known)[qd:]
  return jnp.argmax(logits, -1).astype(jnp.int32), logits


def route_choice(name: str, state, cfg, feats) -> jax.Array:
  """The choice [B] of a fitted feature router from the router member's query features."""
  key = {"trained_router": "head", "graph_router": "gnn"}[name]
  if state is None or key not in state:
    raise core.StrategyError(f"{name} must be fitted on dev first (Strategy.fit)")
  if name == "trained_router":
    return jnp.argmax(_head_apply(state["head"], _standardise(feats, state)), -1).astype(
        jnp.int32)
  if cfg.kind == "reference":
    return reference_graph_choice(state, feats, cfg)
  return fast_graph_choice(state, feats, cfg)[0]


def graph_router_route(params_n, batch: core.Batch, rng, *, cfg: GraphRouterConfig,
                       env: core.Env, state=None):
  """The member each query goes to [B]: the highest predicted edge score."""
  del rng
  feats = batch_features(core.member(params_n, cfg.router), batch, env.config)
  return route_choice("graph_router", state, cfg, feats), {}


@core.register("graph_router", "api", GraphRouterConfig, fit=_fit_graph_router, min_models=2,
               route=graph_router_route)
def graph_router(params_n, batch: core.Batch, rng, *, cfg: GraphRouterConfig, env: core.Env,
                 state=None):
  """Route each query to the model with the highest predicted edge score (kind "reference": a new
  graph of the batch's queries, as the reference routes its test set; "fast": the queries join
  the dev graph)."""
  choice, _ = graph_router_route(params_n, batch, rng, cfg=cfg, env=env, state=state)
  return _answers_routed(params_n, batch, rng, env, choice)
