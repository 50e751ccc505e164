"""Reward-model scoring: a sequence classifier's scalar on (prompt, reply) conversations.

The reference scores `reward_model` tasks (human_interest) with Skywork/Skywork-Reward-Llama-3.1-8B-
v0.2 (model_collaboration/data/eval.py at moco.COMMIT, `reward_model_scores`): the conversation
[user: input, assistant: reply] through the reward model's chat template, one row at a time, the
logit of its single label. Here rows are batched (left-padded to length buckets, positions counted
over real tokens, so padding changes nothing) in one jitted forward whose params may live on a mesh
like any other model's; the score is `transformer.sequence_scores` (the last real token's hidden
state through the `score` head, as HF's *ForSequenceClassification).

  rm = reward.load()                                 # or load("/path/to/rm_dir")
  reward.scores(rm, ["How are you?"], ["Fine, thanks."])   # -> [float]
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Sequence

import jax
import numpy as np

from single_multi import decoding
from single_multi.models import loading, transformer
from single_multi.models.config import ModelConfig

DEFAULT = "hf:Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"  # The reference's reward model.


def load(source: str = DEFAULT, dtype="bfloat16") -> loading.Model:
  """A reward model (a sequence classifier with one label) from a source string; the config is
  checked before any weight is read."""
  directory = (loading.resolve_hub(source.removeprefix("hf:")) if source.startswith("hf:")
               else pathlib.Path(source))
  if (directory / "config.json").is_file():
    labels = ModelConfig.from_hf(json.loads((directory / "config.json").read_text())).num_labels
  else:  # A GGUF file or another source: its config comes with the weights.
    labels = loading.load(source, dtype, tokenizer=False).config.num_labels
  if labels != 1:
    raise loading.LoadError(f"{source} is not a reward model: a sequence classifier with one "
                            f"label is needed, it has {labels} (0: a causal LM)")
  return loading.load(source, dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def _scores(params, tokens_bt, mask_bt, *, config: ModelConfig):
  return transformer.sequence_scores(params, tokens_bt, config, mask_bt=mask_bt)[:, 0]


def scores(model: loading.Model, prompts: Sequence[str], replies: Sequence[str], *,
           batch_size: int = 8) -> list[float]:
  """The reward of each (prompt, reply), through the reward model's chat template."""
  if len(prompts) != len(replies):
    raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
  tok = model.tokenizer
  # The rendered template already holds any special tokens (as apply_chat_template(tokenize=True)).
  texts = [tok.apply_chat_template([{"role": "user", "content": p},
                                    {"role": "assistant", "content": r}],
                                   add_generation_prompt=False, tokenize=False)
           for p, r in zip(prompts, replies)]
  rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  pad = decoding.pad_id_of(tok)
  out: list[float] = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    ids, mask = decoding.left_pad(chunk + [[pad]] * (batch_size - len(chunk)), pad)
    mask[len(chunk):] = 0
    out += np.asarray(_scores(model.params, ids, mask, config=model.config))[:len(chunk)].tolist()
  return out


def for_rows(examples, metric: str, source: str | None) -> loading.Model | None:
  """The reward model a run needs: loaded from `source` (default: the reference's) when some
  row is of a reward-model task, else None (nothing is loaded)."""
  from single_multi.data import moco
  if metric != "moco" or not any(e.subject in moco.REWARD_TASKS for e in examples):
    return None
  return load(source or DEFAULT)
