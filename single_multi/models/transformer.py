"""Functional decoder-only LM (Llama / Mistral / Qwen2 / Gemma) over plain pytrees.

Shape letters: B batch, T query length, S key/cache length, D model width, N query heads,
K key/value heads, G = N // K query heads per kv head, H head dim, F MLP width, V vocab, L layers,
R LoRA rank.

Params are a plain dict; per-layer weights are stacked along a leading L axis and the layers run
under `lax.scan` (one compiled layer, whatever the depth; with LoRA the frozen weights are read
by index and only matmul outputs are kept for the backward pass; `unstack_layers` gives the
per-layer list form that CPU decoding runs as a Python loop):

  embed [V,D]   final_norm [D]   lm_head [D,V] (absent when tied)   score [D,C] (classifiers only)
  layers: attn_norm [L,D]  q [L,D,N,H]  k,v [L,D,K,H]  o [L,N,H,D]
          mlp_norm [L,D]   gate,up [L,D,F]  down [L,F,D]
          optional biases q_bias [L,N,H], k_bias/v_bias [L,K,H], o_bias [L,D],
          gate_bias/up_bias [L,F], down_bias [L,D]

The KV cache is an explicit pytree passed in and returned:
  k [L,B,K,H,S] and v [L,B,K,S,H]: each laid out as its attention dot reads it (q.k contracts H
    against slots on the minor axis, probs.v contracts S), so neither dot transposes the cache;
    or, for the per-layer Python loop (`init_cache(per_layer=True)`), lists of L arrays
    [B,K,H,S] and [B,K,S,H];
  pos [B,S] int32 (position of the token in each slot, -1 = empty or pad);
  end [] int32 (next slot to write; shared by the batch).
Attention visibility is decided by positions: a key is visible to a query when its slot is filled,
its position is <= the query's position, and (sliding layers) it lies inside the window. With
left-padded prompts, positions count real tokens only, as in HF `generate`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from single_multi import sharding
from single_multi.models import lora as lora_lib
from single_multi.models.config import PROJECTIONS, ModelConfig, dim_sizes, param_layout

Params = dict[str, Any]
Cache = dict[str, jax.Array]


def param_shapes(config: ModelConfig) -> dict[str, Any]:
  """Shapes of every parameter (the structure `init_params` and the loaders produce)."""
  sizes = dim_sizes(config)
  return jax.tree.map(lambda letters: tuple(sizes[c] for c in letters), param_layout(config))


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
  """Random params (normal, std 0.02; norms at their identity value) for tests and from-scratch runs."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  keys = jax.random.split(rng, len(leaves))
  out = []
  for path, shape, key in zip(paths, leaves, keys):
    if "norm" in path:
      out.append(jnp.full(shape, 0.0 if config.norm_offset else 1.0, dtype))
    else:
      out.append((0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def is_unstacked(params: Params) -> bool:
  """Whether the layers are per-layer (a list of L dicts, see `unstack_layers`), not stacked."""
  return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: Params, axis: int = 0) -> Params:
  """Per-layer weights as a list of L dicts (forward then runs a Python loop over layers).

  XLA:CPU copies a layer's weights out of the stacked [L, ...] arrays at every step of the layer
  scan (a dot cannot read a dynamically offset operand there); decoding on CPU unstacks once,
  before its loop, and reads each layer's weights in place. axis: the L axis (1 in a pool).
  """
  layers = params["layers"]
  if is_unstacked(params):
    return params
  num_layers = jax.tree.leaves(layers)[0].shape[axis]
  return {**params, "layers": [jax.tree.map(lambda a: jnp.take(a, i, axis=axis), layers)
                               for i in range(num_layers)]}


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, *,
               per_layer: bool = False) -> Cache:
  """An empty cache. per_layer: k and v as lists of L arrays, for unstacked layers (a decode
  loop on CPU): as with the weights (`unstack_layers`), XLA:CPU would otherwise copy each
  layer's keys and values out of the stacked array at every step (measured on the
  135M model, B=16, S=576: 30 layers' attention 302 ms per step with the copies, 166 without)."""
  L, K, H = config.num_layers, config.num_kv_heads, config.head_dim
  if per_layer:
    zeros = lambda shape: [jnp.zeros(shape, dtype) for _ in range(L)]
  else:
    zeros = lambda shape: jnp.zeros((L, *shape), dtype)
  return {
      "k": zeros((batch, K, H, max_len)),
      "v": zeros((batch, K, max_len, H)),
      "pos": jnp.full((batch, max_len), -1, jnp.int32),
      "end": jnp.zeros((), jnp.int32),
  }


def broadcast_rows(cache: Cache, rows: int, lead: int = 0) -> Cache:
  """A cache of one row (a prefilled head every row starts with) read by `rows` rows, without a
  copy. lead: the axes in front of every array but `end` (a pool's N). The row axis of k and v is
  0 per layer (a list of [1, ...]) and 1 stacked ([L, 1, ...]); of pos, 0."""
  def broadcast(a, axis):
    axis += lead
    return jnp.broadcast_to(a, (*a.shape[:axis], rows, *a.shape[axis + 1:]))
  kv_axis = 0 if isinstance(cache["k"], (list, tuple)) else 1
  return {"k": jax.tree.map(lambda a: broadcast(a, kv_axis), cache["k"]),
          "v": jax.tree.map(lambda a: broadcast(a, kv_axis), cache["v"]),
          "pos": broadcast(cache["pos"], 0), "end": cache["end"]}


# Logical names of activations (see sharding.RULES).
_ACT_BTD = ("batch", "seq", "act_embed")
_ACT_BTNH = ("batch", "seq", "act_heads", "head_dim")
_ACT_BTF = ("batch", "seq", "act_mlp")

# -------------------------------------------------------------------------------------------------
# Building blocks.


def rms_norm(x: jax.Array, w: jax.Array, config: ModelConfig) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.rms_norm_eps)
  if config.norm_offset:  # Gemma: (x * (1 + w)) in fp32, then cast.
    return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return w * normed.astype(x.dtype)  # Llama: cast, then scale.


def rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in HF's rotate-half layout; angles in fp32, applied in x's dtype."""
  freqs = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x_btnh.dtype), jnp.sin(emb).astype(x_btnh.dtype)
  half = x_btnh.shape[-1] // 2
  rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
  return x_btnh * cos + rotated * sin


def _activation(name: str):
  return {"silu": jax.nn.silu,
          "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
          "gelu": lambda x: jax.nn.gelu(x, approximate=False)}[name]


def dense(name: str, x: jax.Array, layer: Params, lora: lora_lib.LoraState | None) -> jax.Array:
  """Projection `name` of PROJECTIONS with optional bias and LoRA delta."""
  ins, outs = PROJECTIONS[name]
  y = jnp.einsum(f"BT{ins},{ins}{outs}->BT{outs}", x, layer[name])
  if f"{name}_bias" in layer:
    y = y + layer[f"{name}_bias"]
  if lora is not None and name in lora.params:
    y = y + lora.delta(name, x, ins, outs).astype(y.dtype)
  return y


# Long prefills (and long training rows) attend one block of queries at a time once a layer's
# fp32 scores [B, N, T, S] would exceed SCORES_LIMIT bytes: memory then grows with the block, not
# with T. Every query's row is computed exactly as without blocks. (Measured on the 135M model:
# a 32 x 1536-token prompt decoding 512 tokens needed 13.4 GiB of temporaries unblocked.)
SCORES_LIMIT = 2**30
QUERY_BLOCKS = (512, 256)  # The first that divides T (bucketed lengths >= 768 are 256-multiples).


def attention(q_btnh, k_bkhs, v_bksh, q_pos_bt, k_pos_bs, window, config: ModelConfig):
  """Grouped-query attention with position-based causal / padding / sliding-window visibility;
  in blocks of queries (`lax.map`) where the scores would exceed SCORES_LIMIT bytes."""
  B, T, N, H = q_btnh.shape
  block = next((b for b in QUERY_BLOCKS if T > b and T % b == 0), None)
  if block is None or B * N * T * k_bkhs.shape[3] * 4 <= SCORES_LIMIT:
    return _attention(q_btnh, k_bkhs, v_bksh, q_pos_bt, k_pos_bs, window)
  nb = T // block
  q_blocks = q_btnh.reshape(B, nb, block, N, H).swapaxes(0, 1)
  pos_blocks = q_pos_bt.reshape(B, nb, block).swapaxes(0, 1)
  out = jax.lax.map(lambda qp: _attention(qp[0], k_bkhs, v_bksh, qp[1], k_pos_bs, window),
                    (q_blocks, pos_blocks))
  return out.swapaxes(0, 1).reshape(B, T, N, H)


def _attention(q_btnh, k_bkhs, v_bksh, q_pos_bt, k_pos_bs, window):
  """Queries are laid out [B, K, (G T), H] so both dots are plain batched matmuls over (B, K)
  with the cache read in its stored layout: keys [B,K,H,S] (a [Q,H] x [H,S] matmul; with keys
  [B,K,S,H] XLA:CPU's dot ran 2.4x slower at B=16, S=576), values [B,K,S,H]."""
  B, T, N, H = q_btnh.shape
  K = k_bkhs.shape[1]
  G = N // K
  q = q_btnh.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  logits = jnp.einsum("BKQH,BKHS->BKQS", q, k_bkhs, preferred_element_type=jnp.float32)
  logits = logits.reshape(B, K, G, T, -1) * (H ** -0.5)
  delta = q_pos_bt[:, :, None] - k_pos_bs[:, None, :]  # [B,T,S]
  visible = (k_pos_bs[:, None, :] >= 0) & (delta >= 0)
  visible &= (window <= 0) | (delta < window)
  # A large finite value (not -inf) so a query with nothing visible (a pad) gets no NaN.
  logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bksh.dtype).reshape(B, K, G * T, -1)
  out = jnp.einsum("BKQS,BKSH->BKQH", probs, v_bksh)
  return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


# -------------------------------------------------------------------------------------------------
# The model.


def positions_from_mask(mask_bt: jax.Array, cache: Cache | None = None) -> jax.Array:
  """Positions that count real tokens only (HF generate's `cumsum(mask) - 1`), continuing a cache."""
  pos = jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1
  if cache is not None:
    pos = pos + jnp.sum(cache["pos"] >= 0, axis=1, dtype=jnp.int32)[:, None]
  return jnp.maximum(pos, 0)


def hidden_states(
    params: Params,
    tokens_bt: jax.Array,
    config: ModelConfig,
    *,
    mask_bt: jax.Array | None = None,
    positions_bt: jax.Array | None = None,
    cache: Cache | None = None,
    lora: lora_lib.LoraState | None = None,
) -> tuple[jax.Array, Cache | None]:
  """Final-norm hidden states [B,T,D] (the input of the LM head) and the updated cache.

  mask_bt: 1 for real tokens, 0 for padding (default: all real). positions_bt: default from the
  mask (and the cache). With a cache, the T new tokens are written at slots [end, end+T) and
  attend to everything already cached.
  """
  B, T = tokens_bt.shape
  if mask_bt is None:
    mask_bt = jnp.ones((B, T), jnp.int32)
  mask_bt = mask_bt.astype(bool)
  if positions_bt is None:
    positions_bt = positions_from_mask(mask_bt, cache)
  dtype = params["embed"].dtype
  x = params["embed"][tokens_bt]
  if config.scale_embeddings:
    x = x * jnp.asarray(config.hidden_size ** 0.5, dtype)
  x = sharding.constrain(x, _ACT_BTD)
  inv_freq = jnp.asarray(config.inv_freq())
  act = _activation(config.activation)
  windows = jnp.asarray(config.sliding_windows, jnp.int32)
  new_pos = jnp.where(mask_bt, positions_bt, -1).astype(jnp.int32)
  if cache is not None:
    end = cache["end"]
    k_pos = jax.lax.dynamic_update_slice(cache["pos"], new_pos, (0, end))
  else:
    k_pos = new_pos

  def layer_fn(carry, xs):
    # The whole cache rides in the carry: each layer writes its new keys/values in place with a
    # small dynamic-update-slice (a per-layer cache in xs/ys would be copied at every layer).
    x, kv = carry
    layer, layer_lora, index, window = xs
    if layer is None:  # Frozen weights, read by index (see below).
      layer = jax.tree.map(lambda a: checkpoint_name(
          jax.lax.dynamic_index_in_dim(a, index, 0, False), "frozen_layer"), params["layers"])
    lo = None if lora is None else lora.for_layer(layer_lora, index)
    h = rms_norm(x, layer["attn_norm"], config)
    q = sharding.constrain(rope(dense("q", h, layer, lo), positions_bt, inv_freq), _ACT_BTNH)
    k = rope(dense("k", h, layer, lo), positions_bt, inv_freq).astype(dtype).transpose(0, 2, 3, 1)
    v = dense("v", h, layer, lo).astype(dtype).swapaxes(1, 2)
    if kv is not None:  # New slots start at `end`: k [B,K,H,T] on axis 3, v [B,K,T,H] on 2.
      starts = ((0, 0, 0, end), (0, 0, end, 0))
      if isinstance(kv[0], list):  # Per-layer arrays (index is an int).
        kv = tuple([*c[:index], jax.lax.dynamic_update_slice(c[index], new, start),
                    *c[index + 1:]] for c, new, start in zip(kv, (k, v), starts))
      else:
        kv = tuple(jax.lax.dynamic_update_slice(c, new[None], (index, *start))
                   for c, new, start in zip(kv, (k, v), starts))
      k, v = kv[0][index], kv[1][index]
    a = attention(q, k, v, positions_bt, k_pos, window, config)
    x = x + dense("o", a, layer, lo)
    h = rms_norm(x, layer["mlp_norm"], config)
    h = sharding.constrain(act(dense("gate", h, layer, lo)) * dense("up", h, layer, lo), _ACT_BTF)
    x = sharding.constrain(x + dense("down", h, layer, lo), _ACT_BTD)
    return (x, kv), None

  layer_lora = None if lora is None else lora.params
  kv = (cache["k"], cache["v"]) if cache is not None else None
  if is_unstacked(params):  # A Python loop over the layers.
    for i, layer in enumerate(params["layers"]):
      li = None if layer_lora is None else jax.tree.map(lambda a: a[i], layer_lora)
      (x, kv), _ = layer_fn((x, kv), (layer, li, i, config.sliding_windows[i]))
  else:
    if kv is not None and isinstance(kv[0], list):
      raise ValueError("a per-layer cache (init_cache(per_layer=True)) needs unstacked layers "
                       "(unstack_layers)")
    # With LoRA the base weights are frozen and each layer reads its slice of the stacked weights
    # by index. Scanning over them instead would, under a vmapped pool ([N, L, ...] weights),
    # first transpose every weight to [L, N, ...]: a copy of the whole pool at every call. The
    # slices are not saved for the backward pass (it slices again), or the scan would stack them.
    body, frozen = layer_fn, lora is not None
    if frozen:
      body = jax.checkpoint(layer_fn, prevent_cse=False,
                            policy=jax.checkpoint_policies.dots_saveable)
    xs = (None if frozen else params["layers"], layer_lora, jnp.arange(config.num_layers),
          windows)
    (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
  x = rms_norm(x, params["final_norm"], config)
  new_cache = None
  if cache is not None:
    new_cache = {"k": kv[0], "v": kv[1], "pos": k_pos, "end": end + T}
  return x, new_cache


def lm_head(params: Params, hidden_btd: jax.Array, config: ModelConfig) -> jax.Array:
  """Logits [B,T,V] in float32."""
  if config.tie_word_embeddings:
    logits = jnp.einsum("BTD,VD->BTV", hidden_btd, params["embed"],
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("BTD,DV->BTV", hidden_btd, params["lm_head"],
                        preferred_element_type=jnp.float32)
  return sharding.constrain(logits, ("batch", "seq", "act_vocab"))


def forward(
    params: Params,
    tokens_bt: jax.Array,
    config: ModelConfig,
    *,
    mask_bt: jax.Array | None = None,
    positions_bt: jax.Array | None = None,
    cache: Cache | None = None,
    lora: lora_lib.LoraState | None = None,
) -> tuple[jax.Array, Cache | None]:
  """Logits [B,T,V] (float32) and the updated cache (None when no cache was given)."""
  hidden, cache = hidden_states(params, tokens_bt, config, mask_bt=mask_bt,
                                positions_bt=positions_bt, cache=cache, lora=lora)
  return lm_head(params, hidden, config), cache


def sequence_scores(params: Params, tokens_bt: jax.Array, config: ModelConfig, *,
                    mask_bt: jax.Array | None = None) -> jax.Array:
  """A sequence classifier's scores [B, C] (float32): the score head on the final-norm hidden
  state of each row's last real token (HF *ForSequenceClassification; a reward model's C = 1).
  Left or right padding both work: the last position where mask_bt is 1 is used."""
  if not config.num_labels:
    raise ValueError("sequence_scores needs a sequence classifier (config.num_labels > 0)")
  B, T = tokens_bt.shape
  if mask_bt is None:
    mask_bt = jnp.ones((B, T), jnp.int32)
  hidden, _ = hidden_states(params, tokens_bt, config, mask_bt=mask_bt)
  last_b = jnp.argmax(jnp.where(mask_bt > 0, jnp.arange(T), -1), axis=-1)
  h_bd = jnp.take_along_axis(hidden, last_b[:, None, None], axis=1)[:, 0]
  return jnp.einsum("BD,DC->BC", h_bd, params["score"], preferred_element_type=jnp.float32)
