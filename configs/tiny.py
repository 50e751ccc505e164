"""Tests: a pool of tiny random models (built in-process, see tests/test_evolve.py) on a real
BIG-bench task slice; seconds per round."""

from single_multi import configs


def get_config():
  c = configs.load("quickstart.py", relative_to=__file__)
  c.pool = ("tiny:0", "tiny:1", "tiny:2")  # Resolved by the caller that builds tiny models.
  c.specialists = ()
  c.task = "bigbench:arithmetic/1_digit_addition"
  c.dev_examples = 8
  c.test_examples = 8
  c.batch_size = 8
  c.max_new_tokens = 4
  c.rounds = 1
  c.distill.lora_rank = 4
  c.distill.learning_rate = 1e-2
  c.distill.batch_size = 4
  return c
