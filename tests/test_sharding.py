"""Meshes and the logical-axis rules; 8 fake devices and 2 processes agree with one device."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from single_multi import sharding
from single_multi.models import transformer

HERE = pathlib.Path(__file__).parent
TOL = 1e-5  # Sharded reductions may sum in another order; fp32.


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
  env.pop("XLA_FLAGS", None)
  return env


def test_spec_follows_rules_divisibility_and_single_use():
  mesh = {"model": 1, "data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.spec((8, 64, 4, 16), ("layers", "embed", "heads", "head_dim"), mesh) == \
      P(None, "fsdp", "tensor", None)
  # 3 heads do not divide by tensor=2: replicated, never an error.
  assert sharding.spec((64, 3, 16), ("embed", "heads", "head_dim"), mesh) == P("fsdp", None, None)
  # batch takes data and fsdp; a later dim cannot reuse fsdp.
  assert sharding.spec((8, 64), ("batch", "embed"), mesh) == P(("data", "fsdp"), None)
  # batch 2 only divides by data.
  assert sharding.spec((2, 5), ("batch", "seq"), mesh) == P("data", None)
  # Size-1 mesh axes are skipped.
  assert sharding.spec((64,), ("embed",), {"fsdp": 1, "tensor": 4}) == P(None)
  with pytest.raises(KeyError, match="'nope' has no rule"):
    sharding.spec((4,), ("nope",), mesh)
  with pytest.raises(ValueError, match="has 2 dims but 1 names"):
    sharding.spec((4, 4), ("embed",), mesh)


def test_make_mesh_sizes_and_errors():
  n = jax.device_count()
  mesh = sharding.make_mesh({"fsdp": -1})
  assert dict(mesh.shape) == {"model": 1, "data": 1, "fsdp": n, "tensor": 1}
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"fdsp": 1})
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="needs 3 devices"):
    sharding.make_mesh({"data": 3}, devices=jax.devices()[:1])


def test_param_names_cover_every_param():
  from tiny_config import CONFIG

  names = sharding.param_names(CONFIG)
  shapes = transformer.param_shapes(CONFIG)
  flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
  flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  assert len(flat_names) == len(flat_shapes)
  assert all(len(n) == len(s) for n, s in zip(flat_names, flat_shapes))
  assert names["layers"]["q"] == ("layers", "embed", "heads", "head_dim")


def test_eight_fake_devices_match_one_device():
  out = subprocess.run([sys.executable, str(HERE / "multidevice_worker.py")], env=_env(),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  singles = [r for r in results if not r.get("pool")]
  pools = [r for r in results if r.get("pool")]
  assert len(singles) == 4 and len(pools) == 2
  for r in singles:
    assert r["logits_max_diff"] <= TOL, r
    assert r["cached_step_max_diff"] <= TOL, r
    assert r["tokens_equal"], r
    assert r["sharded_init_max_diff"] <= 1e-6, r
  by_mesh = {json.dumps(r["mesh"], sort_keys=True): r for r in singles}
  full = by_mesh[json.dumps({"data": 2, "fsdp": 2, "tensor": 2}, sort_keys=True)]
  assert full["sharded_param_leaves"] == full["param_leaves"]
  assert full["q_spec"] == "P(None, 'fsdp', 'tensor', None)"
  data_only = by_mesh[json.dumps({"data": 8}, sort_keys=True)]
  assert data_only["sharded_param_leaves"] == 0  # Pure data parallelism replicates params.
  # fsdp=8 splits params ~8 ways: each device holds far less than the replicated copy.
  fsdp = by_mesh[json.dumps({"fsdp": 8}, sort_keys=True)]
  assert max(fsdp["bytes_per_device"]) * 4 < max(data_only["bytes_per_device"])
  for r in pools:
    assert r["tokens_equal"] and r["logprobs_max_diff"] <= TOL, r
    assert r["embed_spec"].startswith("P('model'"), r


def test_two_processes_match_single_process(tmp_path):
  from tiny_config import CONFIG, batch

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(i), "2",
                             str(port), str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  ids, mask = batch()
  params = transformer.init_params(CONFIG, jax.random.key(0))
  ref, _ = transformer.forward(params, jnp.asarray(ids), CONFIG, mask_bt=jnp.asarray(mask))
  got = np.load(tmp_path / "logits.npy")
  assert got.shape == ref.shape
  assert np.abs(got - np.asarray(ref)).max() <= TOL


def test_mesh_plan_runs_distillation_and_the_loop(tmp_path):
  """config.mesh at run time: distillation on a model x fsdp x tensor mesh (LoRA and full) and a
  logit_fusion round on an fsdp x tensor mesh equal one device, with nothing replicated that the
  rules shard."""
  out = subprocess.run([sys.executable, str(HERE / "mesh_loop_worker.py"), str(tmp_path)],
                       env=_env(), capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  lora, full = results["distill"]
  for r in (lora, full):
    assert r["steps"] == 2 and r["loss_max_rel_diff"] <= 1e-5, r
    n, total = r["params_sharded"]
    assert n == total, r  # Every pool param leaf is split over the mesh...
    assert r["embed_spec"] == "P('model', 'tensor', 'fsdp')", r
    n, total = r["trainable_sharded"]
    assert n == total and r["mu_sharded"] == r["trainable_sharded"], r  # ...and every trained one,
    assert r["mu_specs_like_trainable"], r  # Adam's moments exactly like their params,
    assert r["state_bytes_per_device_max"] * 4 <= r["state_bytes_replicated"], r  # so ~1/8 each.
  assert lora["params_max_diff"] <= TOL, lora
  # Full fine-tuning: Adam's first steps move every weight by ~lr (1e-2) whatever the gradient's
  # size, so a near-zero gradient summed in another order may move a weight by a fraction of lr.
  assert full["params_max_diff"] <= 1e-3, full
  loop = results["loop"]
  assert loop["metrics_equal"] and loop["outputs_equal"] and loop["outputs"] >= 4 * 8, loop
  assert loop["last_loss_max_rel_diff"] <= 1e-4, loop
  one, meshed = loop["distill_calls"]
  assert one["in"][0] == 0 and meshed["in"][0] == meshed["in"][1] == meshed["out"][1], loop
  assert meshed["q_spec"] == "P(None, None, 'fsdp', 'tensor', None)", loop
