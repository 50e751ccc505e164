"""Runs sharded forward/decode on 8 fake CPU devices and compares with one device.

Run as a subprocess (the device count must be set before JAX initialises):
  python tests/multidevice_worker.py   -> one JSON line with the comparisons
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import single_multi as sm  # noqa: E402
from single_multi import pool as pool_lib  # noqa: E402
from single_multi import sharding  # noqa: E402
from single_multi.models import transformer  # noqa: E402
from tiny_config import CONFIG, batch  # noqa: E402

MESHES = [
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"fsdp": 8},
    {"data": 8},
    {"tensor": 8},  # 8 does not divide 4 heads: those dims fall back to replicated.
]
POOL_MESHES = [{"model": 2, "fsdp": 2, "tensor": 2}, {"model": 2, "data": 4}]


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def sharded_leaves(tree):
  return sum(any(p is not None for p in x.sharding.spec) for x in jax.tree.leaves(tree))


def main():
  assert jax.device_count() == 8, jax.devices()
  ids, mask = batch()
  params = transformer.init_params(CONFIG, jax.random.key(0))
  ref_logits, _ = transformer.forward(params, jnp.asarray(ids), CONFIG, mask_bt=jnp.asarray(mask))
  decode_kw = dict(config=CONFIG, max_new_tokens=6)
  ref_tokens = sm.decode(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(1),
                         **decode_kw).tokens
  results = []
  for axes in MESHES:
    mesh = sharding.make_mesh(axes)
    shardings = sharding.param_shardings(CONFIG, mesh)
    created = sharding.init_params(CONFIG, jax.random.key(0), mesh)
    placed = sharding.put(params, shardings)
    batch_sh = sharding.named(mesh, ids.shape, ("batch", "seq"))
    logits_sh = sharding.named(mesh, ref_logits.shape, ("batch", "seq", "act_vocab"))
    with jax.set_mesh(mesh):
      fwd = jax.jit(lambda p, t, m: transformer.forward(p, t, CONFIG, mask_bt=m)[0],
                    in_shardings=(shardings, batch_sh, batch_sh), out_shardings=logits_sh)
      logits = fwd(placed, sharding.put(ids, batch_sh), sharding.put(mask, batch_sh))
      # A cached step with the cache donated: prefill, then feed one token.
      cache_sh = sharding.cache_shardings(CONFIG, mesh, ids.shape[0], ids.shape[1] + 1)
      step = jax.jit(lambda p, t, m, c: transformer.forward(p, t, CONFIG, mask_bt=m, cache=c),
                     in_shardings=(shardings, batch_sh, batch_sh, cache_sh),
                     out_shardings=(None, cache_sh), donate_argnums=3)
      cache = sharding.put(transformer.init_cache(CONFIG, ids.shape[0], ids.shape[1] + 1),
                           cache_sh)
      _, cache = step(placed, ids, mask, cache)
      one = np.full((8, 1), 7, np.int32)
      step_logits, cache = step(placed, one, np.ones_like(one), cache)
      tokens = sm.decode(placed, sharding.put(ids, batch_sh), sharding.put(mask, batch_sh),
                         jax.random.key(1), **decode_kw).tokens
    full = np.concatenate([ids, one], axis=1)
    ref_step = transformer.forward(params, jnp.asarray(full), CONFIG,
                                   mask_bt=jnp.asarray(np.concatenate([mask, np.ones_like(one)], 1)))
    results.append({
        "mesh": axes,
        "logits_max_diff": max_diff(logits, ref_logits),
        "cached_step_max_diff": max_diff(step_logits[:, -1], ref_step[0][:, -1]),
        "tokens_equal": bool(np.array_equal(np.asarray(tokens), np.asarray(ref_tokens))),
        "sharded_init_max_diff": max(jax.tree.leaves(jax.tree.map(max_diff, created, params))),
        "sharded_param_leaves": sharded_leaves(placed),
        "param_leaves": len(jax.tree.leaves(placed)),
        "bytes_per_device": sorted(set(sharding.bytes_per_device(placed).values())),
        "q_spec": str(placed["layers"]["q"].sharding.spec),
    })

  members = [params, transformer.init_params(CONFIG, jax.random.key(5))]
  stacked = pool_lib.stack(members)
  combine = pool_lib.LogitAverage()
  ref_pool = pool_lib.decode_combined(stacked, jnp.asarray(ids), jnp.asarray(mask),
                                      jax.random.key(1), combine=combine, **decode_kw)
  for axes in POOL_MESHES:
    mesh = sharding.make_mesh(axes)
    placed = sharding.put(stacked, sharding.param_shardings(CONFIG, mesh, pool_size=2))
    batch_sh = sharding.named(mesh, ids.shape, ("batch", "seq"))
    with jax.set_mesh(mesh):
      out = pool_lib.decode_combined(placed, sharding.put(ids, batch_sh),
                                     sharding.put(mask, batch_sh), jax.random.key(1),
                                     combine=combine, **decode_kw)
    results.append({
        "mesh": axes, "pool": True,
        "tokens_equal": bool(np.array_equal(np.asarray(out.tokens), np.asarray(ref_pool.tokens))),
        "logprobs_max_diff": max_diff(out.logprobs, ref_pool.logprobs),
        "embed_spec": str(placed["embed"].sharding.spec),
    })
  print(json.dumps(results))


if __name__ == "__main__":
  main()
