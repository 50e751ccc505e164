"""BIG-bench Hard (the 20 BBH tasks that are JSON in BIG-bench 1.0.0) with a 7B pool, multi-agent
refinement, multi-student distillation.

Run: python -m single_multi.main --config=configs/bbh.py --workdir=gs://bucket/run
"""

from single_multi import configs


def get_config():
  c = configs.load("mmlu.py", relative_to=__file__)
  c.task = "bbh"
  c.k_shot = 3
  c.strategy = "multiagent_refine"
  c.distill.method = "multi_student_kd"
  return c
