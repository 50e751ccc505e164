"""Run a config as N local CPU processes (jax.distributed with gloo), e.g. the tiny config.

See single_multi/launch.py for the commands; --dry_run prints them. Example:
  python launch/local.py --num_processes=2 --config=configs/tiny.py --workdir=/tmp/run
"""

from single_multi import launch

if __name__ == "__main__":
  launch.cli("local")
