"""Run a config on one or more GPU hosts (one process per host, ssh).

See single_multi/launch.py for the commands; --dry_run prints them. Example:
  python launch/gpu.py --hosts=gpu0,gpu1 --config=configs/mmlu.py --workdir=gs://bucket/run --dry_run
"""

from single_multi import launch

if __name__ == "__main__":
  launch.cli("gpu")
