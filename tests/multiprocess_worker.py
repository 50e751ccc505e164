"""One of N local processes running a sharded forward through `jax.distributed` (gloo on CPU).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
Each process has 2 CPU devices; the mesh spans all processes' devices (fsdp x tensor). Process 0
writes the gathered logits to OUT_DIR/logits.npy.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from single_multi import sharding  # noqa: E402
from single_multi.models import transformer  # noqa: E402

from tiny_config import CONFIG, batch  # noqa: E402


def main(process_id: int, num_processes: int, port: int, out_dir: str):
  sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and jax.local_device_count() == 2, (
      jax.process_count(), jax.local_device_count(), jax.devices())
  mesh = sharding.make_mesh({"fsdp": num_processes, "tensor": 2})
  # Every process builds the same host params; each then places only its own shards.
  with jax.default_device(jax.local_devices()[0]):
    params = jax.tree.map(np.asarray, transformer.init_params(CONFIG, jax.random.key(0)))
  ids, mask = batch()
  param_sh = sharding.param_shardings(CONFIG, mesh)
  batch_sh = sharding.named(mesh, ids.shape, ("batch", "seq"))
  with jax.set_mesh(mesh):
    fwd = jax.jit(lambda p, t, m: transformer.forward(p, t, CONFIG, mask_bt=m)[0],
                  in_shardings=(param_sh, batch_sh, batch_sh))
    logits = fwd(sharding.put(params, param_sh), sharding.put(ids, batch_sh),
                 sharding.put(mask, batch_sh))
  gathered = multihost_utils.process_allgather(logits, tiled=True)
  if process_id == 0:
    np.save(os.path.join(out_dir, "logits.npy"), np.asarray(gathered))
  print(f"process {process_id}: done, logits {gathered.shape}, "
        f"q spec {param_sh['layers']['q'].spec}")


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
