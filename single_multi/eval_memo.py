"""Evaluations kept by what determines them (`config.eval_cache`, `evaluate.evaluate(memo=...)`).

An evaluation's records are a function of the params, the rows (their text, gold answers and
prompt token ids), the method, metric and decoding settings, the strategy with its config and
fitted state, the members' answers a router takes, the reward model, and the code that scores
them. `key` hashes all of these (arrays by `workdir.fingerprints`, on device: no params cross to
the host) into one name; `load` returns the records saved under it, `save` writes them. An
evaluation whose key is present is read instead of decoded: the runs of a sweep (`scripts/
results.py`) share their round 0, whose models, rows and decoding are the same in every run,
and a run re-scores nothing it already scored with the same models.

Under greedy decoding the sampling key changes no answer, so it is left out of the key: round 1's
collaborate stage reads the fit rows' answers that round 0 decoded with the same params. The
package's own source is part of the key, so a changed scorer or decoder never reads an old
result. Several processes read a record only when every one of them finds it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath

from single_multi import decoding, multihost, workdir
from single_multi.data import common

FORMAT = 1  # Bumped when the saved records' layout changes.


@functools.cache
def source_digest() -> str:
  """sha256 of every .py file of the package (path and bytes): part of every key."""
  root = pathlib.Path(__file__).resolve().parent
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return h.hexdigest()


def tree_digest(tree) -> str:
  """A pytree's structure, its leaves' dtypes and shapes and their bits' checksums (arrays,
  including PRNG keys' data) or reprs (Python values)."""
  leaves, treedef = jax.tree.flatten(tree)
  arrays = {}
  described = []
  for i, x in enumerate(leaves):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
      arrays[str(i)] = x
      described.append(f"{x.dtype}{tuple(x.shape)}")
    else:
      described.append(repr(x))
  sums = workdir.fingerprints(arrays) if arrays else {}
  return _sha({"tree": str(treedef), "leaves": described, "sums": sums})


def _sha(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


def key(*, params, config, examples: Sequence[common.Example], prompter, method: str,
        metric: str, split: str, task_name: str, seed: int, max_new_tokens: int,
        batch_size: int, share_prefix: bool, sampler, rng_key, strategy: str | None = None,
        strategy_cfg: Any = None, strategy_state: Any = None, members=None,
        reward_model=None) -> str:
  """The name of an evaluation's records: see the module docstring."""
  rows = []
  for ex in examples:
    row = ex.to_dict()
    if not ex.problem:
      if method == "loglik":
        row["prompt"] = prompter.ids(ex, with_options=False)
        row["options"] = prompter.choice_ids(ex)
      else:
        row["prompt"], row["question_ids"] = prompter.ids(ex), prompter.question_ids(ex)
    rows.append(row)
  greedy = isinstance(sampler, decoding.Greedy)
  parts = {
      "format": FORMAT, "source": source_digest(), "jax": jax.__version__,
      "backend": jax.default_backend(), "params": tree_digest(params), "config": repr(config),
      "rows": _sha(rows), "prompt_config": repr(prompter.config), "method": method,
      "metric": metric, "split": split, "task": task_name, "seed": seed,
      "max_new_tokens": max_new_tokens, "batch_size": batch_size, "share_prefix": share_prefix,
      "sampler": repr(sampler),
      "rng": None if greedy else tree_digest(jax.random.key_data(rng_key)),
      "strategy": strategy, "strategy_cfg": repr(strategy_cfg),
      "strategy_state": None if strategy_state is None else tree_digest(strategy_state),
      "members": None if members is None else _sha(members.records),
      "reward_model": None if reward_model is None else tree_digest(reward_model.params),
  }
  return _sha(parts)


def _path(directory, name: str) -> epath.Path:
  return epath.Path(directory) / f"{name}.jsonl"


def load(directory: str | os.PathLike, name: str) -> list[dict[str, Any]] | None:
  """The records saved under `name`, or None (also when another process has none)."""
  path = _path(directory, name)
  records = None
  if path.exists():
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    found = np.asarray(multihost_utils.process_allgather(np.asarray([records is not None])))
    if not found.all():
      return None
  return records


def save(directory: str | os.PathLike, name: str, records: list[dict[str, Any]]) -> None:
  """Writes the records under `name` (process 0; written whole, then renamed into place)."""
  if not multihost.is_primary():
    return
  path = _path(directory, name)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  tmp.rename(path)
