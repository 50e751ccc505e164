"""Run a config on a TPU VM or pod slice: create, copy, install, run on every worker.

See single_multi/launch.py for the commands; --dry_run prints them. Example:
  python launch/tpu.py --name=sm --zone=us-east5-a --accelerator=v5p-32 --config=configs/mmlu.py --workdir=gs://bucket/run --dry_run
"""

from single_multi import launch

if __name__ == "__main__":
  launch.cli("tpu")
