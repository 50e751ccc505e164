"""Co-LLM at scale (the paper's setting): a 7B base deferring to a math specialist on GSM8K.

Run: python -m single_multi.main --config=configs/co_llm_gsm8k.py --workdir=gs://bucket/run
(GSM8K via the TFDS catalog when online, or a manual dir with train.jsonl/test.jsonl.)
"""

from single_multi import configs


def get_config():
  c = configs.load("co_llm_bigbench.py", relative_to=__file__)
  c.base = "hf:meta-llama/Llama-2-7b-hf"
  c.assistant = "hf:EleutherAI/llemma_7b"
  c.task = "gsm8k"
  c.assistant_subjects = ()
  c.base_subjects = ()  # The base as loaded: Llama-2-7B.
  # The reference trains on GSM8K's full worked solutions (ending "#### N"), not the number;
  # its instruction (which it puts before the problem; ours follows it).
  c.instruction = "Please solve the following math problem with detailed steps."
  c.target = "solution"
  c.dtype = "bfloat16"
  c.train_examples = 7000
  c.val_fraction = 0.05
  c.val_examples = 200
  c.test_examples = 1319
  c.batch_size = 32
  c.max_new_tokens = 256
  # The reference's schedules (clinicalml/co-llm scripts/train/gsm8k/*.sh; co_llm.CoLlmTrainConfig):
  # 2 epochs of batch 128, AdamW 2e-5 linear after 4% warmup, the gate row at the same rate; the
  # gate init at 2e-5, batch 8, one epoch.
  c.train.base = "full"
  c.train.steps = 0
  c.train.epochs = 2.0
  c.train.batch_size = 128
  c.train.learning_rate = 2e-5
  c.train.schedule = "linear"
  c.train.warmup_fraction = 0.04
  c.train.gate_learning_rate = 0.0
  c.train.init_epochs = 1
  c.train.init_batch_size = 8
  c.train.init_learning_rate = 2e-5
  return c
