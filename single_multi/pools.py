"""Building the configured pool (with specialists), and the `--dry_run` sharding plan.

`build(config, workdir)`: loads `config.pool`; with `config.specialists` (task names), fine-tunes
the first source into one specialist per task with a short LoRA SFT on that task's dev rows (gold
answers) that are neither among the loop's dev rows nor its test rows (`specialist_rows`), and
caches each under `<workdir>/specialists/` (reused on a rerun).

`dry_run(config)`: the pool's architecture (known hub ids without downloading, or a local
config.json), params / LoRA / AdamW states as `jax.eval_shape` structures placed by the sharding
rules on `config.mesh` (`abstract_pool`, `abstract_training`: also the inputs compile_plan.py
compiles for a TPU topology), printed per leaf with the bytes on every device. Nothing is
allocated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from single_multi import assets, decoding, distill, multihost, pool as pool_lib, sharding
from single_multi import spec as spec_lib, train as train_lib
from single_multi.data import common, pipeline, tasks
from single_multi.models import lora as lora_lib, loading, transformer
from single_multi.models.config import ModelConfig

# Architectures by hub id, so a plan needs no download (numbers from each model's config.json).
KNOWN_ARCHITECTURES = {
    "Qwen/Qwen2.5-7B-Instruct": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True,
        tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, qkv_bias=True,
        tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768),
    # The paper's second pool (configs/hetero.py) besides Qwen2.5-7B-Instruct.
    "meta-llama/Llama-3.1-8B-Instruct": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192,
        max_position_embeddings=131072, tie_word_embeddings=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=131072),
}


def architecture(source: str) -> ModelConfig:
  if source.startswith("hf:") and source[3:] in KNOWN_ARCHITECTURES:
    return KNOWN_ARCHITECTURES[source[3:]]
  path = pathlib.Path(source)
  if (path / "config.json").exists():
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
  return loading.load(source, tokenizer=False).config  # Small or cached models: just load.


# -------------------------------------------------------------------------------------------------
# Building.


def specialist_rows(config, task_name: str) -> list:
  """The rows a specialist trains on: valid dev rows of its task, none of whose question texts is
  among the loop's dev rows (`config.task`'s balanced dev selection, what the pool collaborates
  on and distils from) or its test rows, in a seeded order (salted, so independent of every other
  selection), the first `config.specialist_examples`. Checked, not assumed: a row shared with the
  loop's dev or test rows raises DataError."""
  task = tasks.from_config(task_name, config)
  loop = tasks.from_config(config.task, config)
  dev = common.balanced(loop.dev, config.dev_examples, config.seed)
  test = [e for e in loop.examples(loop.spec.test_split) if not e.problem]
  taken = {common.normalize_question(e.question) for e in dev + test}
  rows = sorted((e for e in task.dev if not e.problem
                 and common.normalize_question(e.question) not in taken),
                key=lambda e: common.split_fraction("specialist\x00" + e.id, config.seed))
  rows = rows[:config.specialist_examples]
  for what, held in (("the loop's dev rows", dev), ("the loop's test rows", test)):
    common.check_disjoint([e.question for e in rows], [e.question for e in held],
                          f"specialist {task_name} vs {what}")
  return rows


def specialist_prompter(config, tokenizer, task_name: str) -> pipeline.Prompter:
  """The prompter a specialist is fine-tuned with (its family's prompt style, no shots)."""
  task = tasks.from_config(task_name, config)
  return pipeline.Prompter(tokenizer, pipeline.PromptConfig(k_shot=0, style=task.spec.prompt))


def replay_rows(config, tokenizer, eos_id: int, rows: dict[str, np.ndarray],
                k: int) -> dict[str, np.ndarray]:
  """`distill.replay`: each member's training rows [N, R + k, T], the round's rows [R, T'] (the
  same for every member), then the first k rows its specialist was fine-tuned on
  (`specialist_rows`: the same prompts, the gold answer, eos), so that a member keeps its own
  family while it learns the others'. Member i is the specialist of `config.specialists[i]`
  (`build`). Not in the reference, which trains on the collaboration's outputs only."""
  own = []
  for name in config.specialists:
    examples = specialist_rows(config, name)[:k]
    if len(examples) < k:
      raise common.DataError(f"distill.replay={k}: specialist {name} has {len(examples)} rows")
    t, m, lm = pipeline.sft_rows(specialist_prompter(config, tokenizer, name), examples,
                                 [pipeline.gold_answer(e) for e in examples], eos_id)
    own.append({"tokens": t, "mask": m, "loss_mask": lm})
  width = max(x["tokens"].shape[-1] for x in [rows, *own])
  pad_id = pipeline.pad_id_of(tokenizer)

  def left(x, key):  # Left-pad the sequence axis to the common width.
    return np.pad(np.asarray(x), ((0, 0), (width - x.shape[-1], 0)),
                  constant_values=pad_id if key == "tokens" else 0)

  return {key: np.stack([np.concatenate([left(rows[key], key), left(o[key], key)]) for o in own])
          for key in ("tokens", "mask", "loss_mask")}


def specialist(base: loading.Model, task_name: str, directory: pathlib.Path, config) -> Any:
  """The base fine-tuned (LoRA, merged) on `specialist_rows`; cached in `directory`."""

  def rows():
    return (specialist_rows(config, task_name),
            specialist_prompter(config, base.tokenizer, task_name))

  return finetuned(base, rows, directory, steps=config.specialist_steps,
                   optim=train_lib.OptimConfig(learning_rate=config.specialist_learning_rate),
                   batch_size=8, seed=config.seed, lora=SPECIALIST_LORA,
                   dtype=jnp.dtype(config.dtype), desc=f"specialist {task_name}")


def finetuned(base: loading.Model, rows: Callable[[], tuple[Sequence[Any], pipeline.Prompter]],
              directory: pathlib.Path, *, steps: int, optim: train_lib.OptimConfig,
              batch_size: int, seed: int, lora: lora_lib.LoraConfig | None, dtype,
              desc: str, answer: Callable[[Any], str] = pipeline.gold_answer) -> Any:
  """The base fine-tuned on the rows `rows()` gives (prompt -> gold answer, with its prompter;
  built only when nothing is cached), LoRA merged when `lora`, saved as an HF directory and reused
  when `directory` holds one. The loop's specialists and the Co-LLM job's assistant come from
  here. Batches of min(batch_size, rows); `answer(example)` is the target text."""
  cached = (directory / "config.json").exists()
  # Every process has looked before process 0 may start writing this directory below.
  multihost.sync(f"finetuned {directory.name}")
  if cached:
    logging.info("reusing %s", directory)
    return loading.load(str(directory), dtype, tokenizer=False).params
  examples, prompter = rows()
  eos = decoding.stop_ids_for(base.config, base.tokenizer)[0]
  tokens, mask, loss_mask = pipeline.sft_rows(prompter, examples,
                                              [answer(e) for e in examples], eos)
  params, _ = train_lib.finetune(base.params, tokens, mask, loss_mask, base.config, optim=optim,
                                 steps=steps, batch_size=min(batch_size, len(examples)),
                                 seed=seed, lora=lora, desc=desc)
  if multihost.is_primary():
    loading.save_hf(directory, base.config, params)
  return params


SPECIALIST_LORA = lora_lib.LoraConfig(rank=8, alpha=16.0, dropout=0.0)


def _source_identity(source: str) -> list:
  """A model source, plus the size and mtime of its local files (a changed file is a new base)."""
  path = pathlib.Path(source)
  files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
  return [source] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files
                     if f.is_file()]


def specialist_key(config, task_name: str) -> str:
  """16 hex digits of everything that determines a specialist: base, task, data and recipe."""
  key = json.dumps([_source_identity(config.pool[0]), task_name, config.dtype, config.seed,
                    config.specialist_steps, config.specialist_examples,
                    # The rows held out of its training (`specialist_rows`).
                    "disjoint-v1", config.task, config.dev_examples,
                    config.specialist_learning_rate, dataclasses.astuple(SPECIALIST_LORA),
                    config.get("moco_data_dir", "")]
                   + ([config.data_manual_dir] if config.get("data_manual_dir") else []))
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def build(config, workdir) -> pool_lib.Pool | pool_lib.Groups:
  dtype = jnp.dtype(config.dtype)
  sources = list(config.pool)
  if config.get("pool_kind", "stacked") == "heterogeneous":
    return pool_lib.load_groups(sources, dtype)  # Specialists: refused by `spec.validate`.
  if not config.specialists:
    return pool_lib.load_pool(sources, dtype)
  base = loading.load(sources[0], dtype)
  # Cached next to the run (a bucket workdir: on the local disk), each keyed by everything it is
  # made from, so a changed base, task or recipe never reuses a stale specialist.
  root = (assets.cache_root() if "://" in str(workdir) else pathlib.Path(workdir)) / "specialists"
  models, names = [], []
  for name in config.specialists:
    slug = name.split(":")[-1].replace("/", "_").replace(",", "+")
    params = specialist(base, name, root / f"{slug}-{specialist_key(config, name)}", config)
    models.append(loading.Model(base.config, params, base.tokenizer, f"{slug}"))
    names.append(slug)
  return pool_lib.from_models(models, names)


# -------------------------------------------------------------------------------------------------
# The plan.


def placed(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree,
                      shardings)


def abstract_pool(arch, n: int, mesh, dtype):
  """The stacked pool's params as placed ShapeDtypeStructs."""
  params = jax.eval_shape(lambda k: jax.vmap(lambda kk: transformer.init_params(arch, kk, dtype))(
      jax.random.split(k, n)), jax.random.key(0))
  return placed(params, sharding.param_shardings(arch, mesh, pool_size=n))


def abstract_training(arch, n: int, mesh, params, dcfg: distill.DistillConfig, total_steps: int):
  """(trainable, opt_state, optimizer, trainable shardings) as the distillation places them:
  LoRA (or full) params and AdamW moments like the params they track, step counters replicated."""
  if dcfg.lora is not None:
    t_shard = sharding.lora_shardings(arch, dcfg.lora, mesh, n)
    trainable = placed(jax.eval_shape(lambda k: jax.vmap(lambda kk: lora_lib.init(
        arch, dcfg.lora, kk))(jax.random.split(k, n)), jax.random.key(0)), t_shard)
  else:
    trainable, t_shard = params, sharding.param_shardings(arch, mesh, pool_size=n)
  optimizer = train_lib.make_optimizer(dcfg.optim, total_steps)
  opt = jax.eval_shape(jax.vmap(optimizer.init), trainable)
  opt = placed(opt, sharding.opt_state_shardings(optimizer, opt, t_shard, mesh))
  return trainable, opt, optimizer, t_shard


def dry_run(config) -> dict[str, Any]:
  """Prints and returns the plan: per leaf shape / spec, totals, bytes per device. A
  heterogeneous pool (`pool_kind`): one plan per architecture group, naming its members (grouped
  by architecture alone: the plan reads no tokenizer), and the bytes per device of all groups."""
  configs = [architecture(s) for s in config.pool]
  mesh = sharding.make_mesh(dict(config.mesh))
  dtype = jnp.dtype(config.dtype)
  dcfg = spec_lib.distill_config(config)
  if config.get("pool_kind", "stacked") != "heterogeneous":
    if any(c != configs[0] for c in configs[1:]):
      raise pool_lib.PoolMismatchError("the dry run plans a stacked pool: the sources differ in "
                                       "architecture (pool_kind='heterogeneous' plans each "
                                       "architecture group)")
    return _plan(configs[0], len(configs), mesh, dtype, dcfg)
  groups: dict[Any, list[str]] = {}
  for source, arch in zip(config.pool, configs):
    groups.setdefault(arch, []).append(source)
  plans = []
  for g, (arch, members) in enumerate(groups.items()):
    print(f"group{g}: {', '.join(members)}")
    plans.append(_plan(arch, len(members), mesh, dtype, dcfg) | {"members": members})
  per_device = {d: sum(p["bytes_per_device"].get(d, 0) for p in plans)
                for d in plans[0]["bytes_per_device"]}
  print(f"all {len(plans)} groups, bytes per device: " + ", ".join(
      f"{d}: {v / 2**30:.2f} GiB" for d, v in sorted(per_device.items())))
  return {"groups": plans, "bytes_per_device": per_device, "mesh": plans[0]["mesh"]}


def _plan(arch, n: int, mesh, dtype, dcfg) -> dict[str, Any]:
  """One stacked pool's plan: n members of architecture `arch` on `mesh`."""
  params = abstract_pool(arch, n, mesh, dtype)
  trainable, opt_state, _, _ = abstract_training(arch, n, mesh, params, dcfg, 1000)
  trees = {"params": params}
  if dcfg.lora is not None:
    trees["lora"] = trainable
  trees["opt_state"] = opt_state
  lines, replicated = [], []
  for group, tree in trees.items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      spec = leaf.sharding.spec
      name = group + jax.tree_util.keystr(path)
      nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
      sharded = any(a is not None for a in spec)
      if not sharded:
        replicated.append((name, nbytes))
      lines.append(f"  {name:60s} {str(leaf.shape):28s} {str(leaf.dtype):9s} {spec}")
  per_device = sharding.bytes_per_device(list(trees.values()))
  total = {g: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(t))
           for g, t in trees.items()}
  print(f"Dry run: {n} x {arch.model_type} (hidden {arch.hidden_size}, {arch.num_layers} layers, "
        f"vocab {arch.vocab_size}) on mesh {dict(mesh.shape)} ({mesh.devices.size} devices), "
        f"{dtype.name}, distill {'LoRA r=%d' % dcfg.lora.rank if dcfg.lora else 'full'}")
  print("\n".join(lines))
  print("total bytes: " + ", ".join(f"{g} {v / 2**30:.2f} GiB" for g, v in total.items()))
  print("bytes per device: " + ", ".join(f"{d}: {v / 2**30:.2f} GiB"
                                         for d, v in sorted(per_device.items())))
  big = [(k, v) for k, v in replicated if v >= 2**20]
  print(f"replicated leaves: {len(replicated)} ({sum(v for _, v in replicated) / 2**20:.2f} MiB "
        f"in all; {len(big)} of them >= 1 MiB)")
  return {"mesh": dict(mesh.shape), "total_bytes": total, "bytes_per_device": per_device,
          "replicated": replicated, "leaves": len(lines)}
