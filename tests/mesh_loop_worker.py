"""Distillation and the loop on an fsdp/tensor mesh of 8 fake CPU devices vs one device.

Run as a subprocess (the device count must be set before JAX initialises):
  python tests/mesh_loop_worker.py WORKDIR   -> one JSON line with the comparisons
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from single_multi import distill, evolve, pool as pool_lib, sharding  # noqa: E402
from single_multi import train as train_lib  # noqa: E402
from single_multi.models import lora as lora_lib, tiny, transformer  # noqa: E402
from configs_loader import load_config  # noqa: E402
from tiny_config import CONFIG  # noqa: E402


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def sharded(tree):
  """(leaves split over at least one mesh axis, all leaves)."""
  leaves = jax.tree.leaves(tree)
  return (sum(any(p is not None for p in getattr(x.sharding, "spec", ())) for x in leaves),
          len(leaves))


def data(n=16):
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 200, (n, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[::3, :3] = 0
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, 7:] = 1
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def distill_on_mesh(lora):
  params_n = pool_lib.stack([transformer.init_params(CONFIG, jax.random.key(s)) for s in (0, 1)])
  cfg = distill.DistillConfig(lora=lora, batch_size=4, epochs=1.0,
                              optim=train_lib.OptimConfig(learning_rate=1e-2, accumulation=2))
  one = sharding.make_mesh({}, jax.devices()[:1])
  ref, _, ref_hist = distill.distill(params_n, data(), CONFIG, cfg, progress=False, mesh=one)
  mesh = sharding.make_mesh({"model": 2, "fsdp": 2, "tensor": 2})
  out, state, hist = distill.distill(params_n, data(), CONFIG, cfg, progress=False, mesh=mesh)
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")  # Adam's first moments.
  replicated = sum(x.nbytes for x in jax.tree.leaves((state.trainable, state.opt_state)))
  return {
      "lora": lora is not None,
      "params_max_diff": max_diff(out, ref),
      "loss_max_rel_diff": float(np.max(np.abs(np.asarray([h["loss"] for h in hist]) /
                                               np.asarray([h["loss"] for h in ref_hist]) - 1))),
      "steps": len(hist),
      "params_sharded": sharded(out),
      "trainable_sharded": sharded(state.trainable),
      "mu_sharded": sharded(mu),
      "mu_specs_like_trainable": [str(a.sharding.spec) for a in jax.tree.leaves(mu)] ==
                                 [str(a.sharding.spec) for a in jax.tree.leaves(state.trainable)],
      "state_bytes_per_device_max": max(sharding.bytes_per_device(
          (state.trainable, state.opt_state)).values()),
      "state_bytes_replicated": replicated,
      "embed_spec": str(out["embed"].sharding.spec),
  }


def loop_on_mesh(workdir):
  pool = pool_lib.from_models([tiny.model(s) for s in range(3)], ["t0", "t1", "t2"])
  seen = []
  real = evolve.distill.distill

  def spy(params, *args, **kwargs):
    out = real(params, *args, **kwargs)
    seen.append({"in": sharded(params), "out": sharded(out[0]),
                 "q_spec": str(getattr(out[0]["layers"]["q"].sharding, "spec", None))})
    return out

  evolve.distill.distill = spy
  histories = {}
  for name, mesh in (("one", {}), ("fsdp_tensor", {"fsdp": 4, "tensor": 2})):
    c = load_config("tiny.py")
    c.strategy = "logit_fusion"
    c.mesh = mesh
    histories[name] = evolve.run(c, pathlib.Path(workdir) / name, pool, progress=False)
  strip = lambda h: [{k: v for k, v in m.items() if k != "distill"} for m in h]
  losses = lambda h: np.asarray(h[1]["distill"]["last_loss"])
  outputs = {}  # Every generated answer (singles and collaboration, dev and test, all rounds).
  for name in histories:
    files = sorted((pathlib.Path(workdir) / name).glob("round_*/*/records.jsonl"))
    outputs[name] = {(str(f.relative_to(pathlib.Path(workdir) / name)), r["model"], r["id"]):
                     r["output"] for f in files
                     for r in map(json.loads, f.read_text().splitlines())}
  return {
      "metrics_equal": strip(histories["one"]) == strip(histories["fsdp_tensor"]),
      "outputs": len(outputs["one"]),
      "outputs_equal": outputs["one"] == outputs["fsdp_tensor"],
      "last_loss_max_rel_diff": float(np.max(np.abs(losses(histories["fsdp_tensor"]) /
                                                    losses(histories["one"]) - 1))),
      "collab": [m["collab"] for m in histories["fsdp_tensor"]],
      "distill_calls": seen,
  }


def main():
  assert jax.device_count() == 8, jax.devices()
  results = {"distill": [distill_on_mesh(lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0)),
                         distill_on_mesh(None)],
             "loop": loop_on_mesh(sys.argv[1])}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
