"""A heterogeneous pool in seconds: two tiny random Llamas (byte tokenizer) and a tiny random
Qwen2 with another tokenizer and chat template (`models/tiny.py`), collaborating in text on a real
BIG-bench slice; each architecture group distils the collaboration's answers with its own
tokenizer (hetero_loop.py).

  python -m single_multi.main --config=configs/tiny_hetero.py --workdir=/tmp/tiny_hetero
"""

from ml_collections import config_dict

from single_multi import configs


def get_config():
  c = configs.load("tiny.py", relative_to=__file__)
  c.pool = ("tiny:0", "tiny-qwen2:0", "tiny:1")
  c.pool_kind = "heterogeneous"
  c.strategy = "multiagent_refine"
  c.strategy_config = config_dict.ConfigDict({"rounds": 1})
  c.distill.method = "supervised_kd"
  c.distill.lora_rank = 0  # Full fine-tuning of each group's members.
  c.distill.learning_rate = 1e-3
  return c
