"""Tests and the local multi-process launcher: three tiny random models (`tiny:<seed>`,
single_multi/models/tiny.py) on a real BIG-bench slice; seconds per round.

  python -m single_multi.main --config=configs/tiny.py --workdir=/tmp/tiny
  python launch/local.py --num_processes=2 --config=configs/tiny.py --workdir=/tmp/tiny2
"""

from ml_collections import config_dict

from single_multi import configs


def get_config():
  c = configs.load("quickstart.py", relative_to=__file__)
  c.pool = ("tiny:0", "tiny:1", "tiny:2")  # Random 2-layer models, byte tokenizer (models/tiny.py).
  c.specialists = ()
  c.task = "bigbench:arithmetic/1_digit_addition"
  c.dev_examples = 8
  c.fit_examples = 0
  c.distill.correctness_filter = False  # Random models answer nothing right.
  c.test_examples = 8
  c.batch_size = 8
  c.max_new_tokens = 4
  c.rounds = 1
  c.strategy = "logit_fusion"
  c.strategy_config = config_dict.ConfigDict()
  c.distill.lora_rank = 4
  c.distill.learning_rate = 1e-2
  c.distill.batch_size = 4
  c.distill.epochs = 1.0
  return c
