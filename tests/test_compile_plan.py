"""Ahead-of-time compilation for a TPU topology on this CPU host (compile_plan.py).

Needs the TPU compiler: `pip install -e ".[tpu]"` (the README's test command installs it).
"""

import importlib.util
import json
import math
import os

import pytest

from single_multi import compile_plan, configs, sharding
from single_multi.models.config import ModelConfig

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu (the TPU compiler) is not installed: '
                                         'pip install -e ".[tpu]"')

# TPU-tile-friendly sizes (last dims multiples of 128, >= 8 rows per device), so the compiler's
# buffers are the plain products a hand count gives (no (8, 128) tile padding); and caches of
# hundreds of MiB per device, since the TPU compiler keeps small buffers in on-chip VMEM, which
# memory_analysis() does not count as HBM.
ARCH = ModelConfig(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                   num_layers=2, num_heads=2, num_kv_heads=1, head_dim=128,
                   tie_word_embeddings=False, eos_token_ids=(1,))
N, P, M = 3, 1024, 64


def _config(batch_size, **overrides):
  c = configs.load("configs/tiny.py")
  c.batch_size = batch_size
  c.compile_prompt_length = P
  c.max_new_tokens = M
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _compiled(config, topo, names):
  mesh = sharding.make_mesh(dict(config.mesh), devices=topo.devices)
  progs = [p for p in compile_plan.programs(config, ARCH, N, mesh) if p.name in names]
  return {p.name: compile_plan.compile_program(p, mesh, topo.hbm_bytes) for p in progs}


def test_unknown_topology_and_missing_compiler_fail_at_once(monkeypatch):
  with pytest.raises(compile_plan.TopologyError, match="unknown TPU topology"):
    compile_plan.topology("v9z:2x2")
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else object())
  with pytest.raises(compile_plan.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
    compile_plan.topology("v5e:2x2")


@needs_libtpu
def test_doubling_the_batch_grows_arguments_and_cache_by_their_hand_count(monkeypatch):
  topo = compile_plan.topology("v5e:2x2")
  assert (len(topo.devices), topo.chips, topo.hbm_bytes) == (4, 4, 16e9)
  # The hand count below is of the program with whole attention; these prefills (B x 4 heads x
  # 1024 x 1088 fp32 scores > 1 GiB) would attend in query blocks, checked at the end.
  import jax
  from single_multi.models import transformer
  monkeypatch.setattr(transformer, "SCORES_LIMIT", 2**62)
  jax.clear_caches()  # The limit is read at trace time.
  small = _compiled(_config(256), topo, ("singles_decode",))["singles_decode"]
  large = _compiled(_config(512), topo, ("singles_decode",))["singles_decode"]
  data = 4  # tiny.py's mesh {"data": -1}: the rows are split over all 4 devices.
  # Arguments: the params (unchanged) + prompt and mask [B, P] int32, rows over the data axis.
  prompt_bytes = lambda b: 2 * (b // data) * P * 4  # noqa: E731
  assert (large["bytes_per_device"]["argument"] - small["bytes_per_device"]["argument"]
          == prompt_bytes(512) - prompt_bytes(256))
  # Temporaries hold the KV cache (pool.init_cache: k [N, L, B, Kv, H, P + M] and v
  # [N, L, B, Kv, P + M, H] fp32, pos [N, B, P + M] int32), so doubling the batch adds at least
  # its growth (214 MB per device), and (everything in the program being per row or fixed) at
  # most doubles them, give or take VMEM (128 MiB on v5e): buffers of up to 128 MiB held there at
  # B rows, not counted as HBM, are twice that in HBM at 2B rows. (Measured with the stacked
  # layers an accelerator decodes with: 1.90 / 4.25 / 8.73 GB at 128 / 256 / 512 rows.)
  cache = lambda b: N * (b // data) * (P + M) * (  # noqa: E731
      2 * ARCH.num_layers * ARCH.num_kv_heads * ARCH.head_dim * 4 + 4)
  grown = large["bytes_per_device"]["temp"] - small["bytes_per_device"]["temp"]
  assert grown >= cache(512) - cache(256)
  assert large["bytes_per_device"]["temp"] <= 2 * (small["bytes_per_device"]["temp"] + 2 ** 27)
  assert small["fits"] and large["fits"]
  assert large["flops"] > 1.9 * small["flops"]  # Per-row work (prefill, heads) doubles.
  # Attention in query blocks (the default above SCORES_LIMIT) needs fewer temporaries for the
  # same program (measured: 6.52 GB per device instead of 8.73 at 512 rows).
  monkeypatch.undo()
  jax.clear_caches()
  blocked = _compiled(_config(512), topo, ("singles_decode",))["singles_decode"]
  assert blocked["bytes_per_device"]["temp"] < 0.8 * large["bytes_per_device"]["temp"]
  assert blocked["bytes_per_device"]["argument"] == large["bytes_per_device"]["argument"]


@needs_libtpu
def test_verdict_flips_for_a_plan_too_large_for_the_chip(tmp_path):
  topo = compile_plan.topology("v5e:2x2")
  # KV cache alone: 3 x 2 layers x 2 x (P + M) x 128 x 4 bytes = 3.3 MB per row; 32768 rows
  # over 4 devices = 27 GB per device, more than v5e's 16 GB.
  big = _compiled(_config(32768), topo, ("singles_decode",))["singles_decode"]
  assert not big["fits"] and big["hbm_fraction"] > 1
  # The CLI path on the tiny config: every program, the table, compile_plan.json.
  c = _config(16, compile_topology="v5e:2x2", fused_round=True)
  lines = []
  out = compile_plan.plan(c, tmp_path, print_fn=lines.append)
  saved = json.loads((tmp_path / "compile_plan.json").read_text())
  assert [p["name"] for p in saved["programs"]] == [
      "singles_decode", "singles_decode_head", "collaboration", "train_step", "round"]
  for p in saved["programs"]:
    b = p["bytes_per_device"]
    assert b["total"] == b["argument"] + b["output"] - b["alias"] + b["temp"] > 0
    assert p["fits"] and p["flops"] > 0
  assert saved["fits"] and lines[-2].startswith("fits on v5e:2x2: yes, peak ")
  assert out["summary"] == saved["summary"]
  assert math.isclose(saved["hbm_bytes_per_device"], 16e9)


def test_compiler_warnings_are_read_from_this_process_log(tmp_path, monkeypatch):
  """libtpu logs its compiler's warnings to files in $TPU_LOG_DIR named by process id; the plan
  reads the lines this process's WARNING log gained during a compile."""
  monkeypatch.setenv("TPU_LOG_DIR", str(tmp_path))
  pid = os.getpid()
  mine = tmp_path / f"tpu_driver.host.user.log.WARNING.20261201-000000.{pid}"
  other = tmp_path / f"tpu_driver.host.user.log.WARNING.20261201-000000.{pid + 1}"
  mine.write_text("W1201 old warning\n")
  other.write_text("W1201 spmd_partitioner.cc] Involuntary full rematerialization (other)\n")
  _, offsets = compile_plan.warnings_since()
  new = ("W1201 spmd_partitioner.cc:652] [spmd] Involuntary full rematerialization. The compiler "
         "cannot go from sharding {devices=[4,1]<=[4]} to {devices=[1,4]<=[4]} efficiently for "
         "HLO operation %gather.3")
  with open(mine, "a") as f:
    f.write(new + "\n")
  lines, _ = compile_plan.warnings_since(offsets)
  assert lines == [new] and compile_plan.REMAT.search(lines[0])
