"""Ahead-of-time compilation of a round's programs for a TPU topology, on a host without a TPU.

    pip install -e ".[tpu]"     # libtpu, the TPU compiler (the version the installed jax needs)
    python -m single_multi.main --config=configs/mmlu.py --dry_run \
        --config.compile_topology=v5p:2x2x2

`jax.experimental.topologies` builds the TPU devices of a named topology without any TPU; the
configured mesh (`config.mesh`) is laid over them; every program a round runs is lowered from
abstract shapes (`jax.ShapeDtypeStruct`s placed by `sharding.RULES`, nothing materialised) and
compiled by the TPU compiler, whose `memory_analysis()` and `cost_analysis()` give, per device,
the argument / output / temporary bytes, the FLOPs and the bytes accessed. Each program's peak is
set against the chip's HBM (`HBM_GB`) for a fit verdict. The anchor for this practice is MaxText's
`train_compile.py`.

Programs (the ones `evolve.run` calls, with the config's shapes):
  singles_decode   every model answers a prompt batch (`pool.decode_each`): batch_size rows of
                   `compile_prompt_length` tokens, `max_new_tokens` decoded
  singles_decode_head  the same with the prompts' shared head prefilled once (evaluate's decode
                   of generated answers): half the prompt bucket as the head, half per row
  collaboration    the strategy's program (`collab._run`) on the same batch (strategies fitted
                   on dev are planned with their fitted state only when it has a known shape:
                   otherwise the line says so)
  train_step       one optimizer step of the vmapped pool distillation (`distill.make_pool_step`):
                   distill.batch_size x accumulation rows of prompt + output tokens
  round            with `fused_round`: the whole round (`fused.round_program`) over
                   dev_examples dev rows and test_examples test rows

Per program it also reports the large (>= 1 MiB per device) arguments the compiled program keeps
replicated on every device, and the TPU compiler's "involuntary full rematerialization" warnings
(a sharded array the partitioner could only reshard by replicating it whole), read from libtpu's
log (`$TPU_LOG_DIR`, default /tmp/tpu_logs: its warnings go there, not to stderr). A program the
compiler refuses for want of HBM is reported with the compiler's own figure, as not fitting.

FLOPs and bytes accessed are XLA's static counts: a `while` loop's body (a decode step, a
gradient-accumulation micro-batch) is counted once, not once per iteration.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from single_multi import collab, decoding, distill, pool as pool_lib, pools, sharding

# HBM per chip, in GB (1e9 bytes; the docs' unit, so the verdict errs on the safe side), from the
# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/system-architecture-tpu-vm,
# .../v5e, .../v5p, .../v6e). A topology's devices share their chip's HBM (v2-v4 AOT topologies
# list one device per TensorCore).
HBM_GB = {"v2": 16, "v3": 32, "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
TOPOLOGIES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16",
              "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4",
              "v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:2x4x4", "v4:4x4x4",
              "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:8x8", "v6e:16x16")
INSTALL = 'pip install -e ".[tpu]"   (libtpu for the installed jax: pip install "jax[tpu]==%s")'
REMAT = re.compile(r"[Ii]nvoluntary full rematerialization")
BIG = 2 ** 20  # A replicated argument worth naming: at least 1 MiB on each device.


class TopologyError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: tuple
  chips: int
  hbm_bytes: float  # Per device.

  @property
  def generation(self) -> str:
    return self.name.split(":")[0]


def topology(name: str) -> Topology:
  """The TPU devices of topology `name` ("v5p:2x2x2"), built without a TPU (needs libtpu)."""
  gen, _, dims = name.partition(":")
  if gen not in HBM_GB or not re.fullmatch(r"\d+(x\d+)+", dims):
    raise TopologyError(f"unknown TPU topology {name!r}: give <generation>:<chips per axis> with "
                        f"a generation in {sorted(HBM_GB)}, e.g. {', '.join(TOPOLOGIES[:4])}")
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(f"compiling for {name} needs the TPU compiler (libtpu), which is not "
                        f"installed: {INSTALL % jax.__version__}")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # No metadata server: this is not a TPU VM.
  # Compiling touches no chip: other processes may compile at the same time (libtpu's lockfile
  # would refuse them).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  log_dir().mkdir(parents=True, exist_ok=True)
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # noqa: BLE001 (libtpu reports a bad shape as a generic error)
    raise TopologyError(f"libtpu cannot build topology {name!r}: {e}") from e
  chips = math.prod(int(d) for d in dims.split("x"))
  devices = tuple(desc.devices)
  return Topology(name, devices, chips, HBM_GB[gen] * 1e9 * chips / len(devices))


# -------------------------------------------------------------------------------------------------
# Abstract inputs.


def rows_struct(mesh, shape, dtype=jnp.int32, pool: bool = False):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.rows(mesh, shape, pool))


def key_struct(mesh, rows: int):
  """Per-row sampling keys [rows] (`evaluate.example_keys`), placed like the rows."""
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct((rows,), key.dtype,
                              sharding=sharding.named(mesh, (rows,), ("batch",)))


class _LengthTokenizer:
  """Stands in for a tokenizer the plan cannot load (a hub id, offline): text of c characters is
  ceil(c / 3) tokens (English BPE averages about 4), so the templates' lengths err long."""

  chat_template = None
  eos_token_id = None
  pad_token_id = 0

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [0] * math.ceil(len(text) / 3)}


def _tokenizer(source: str):
  """The pool's tokenizer where it comes without the weights (an HF directory, tiny:<seed>), for
  the text strategies' templates; None otherwise (a hub id: the plan downloads nothing)."""
  from single_multi.models import loading, tiny
  if source.startswith("tiny:"):
    return tiny.ByteTokenizer()
  if pathlib.Path(source).is_dir():
    try:
      return loading._auto_tokenizer(source)
    except loading.LoadError:
      return None
  return None


# -------------------------------------------------------------------------------------------------
# Programs.


@dataclasses.dataclass
class Program:
  name: str
  fn: Any  # A jitted function.
  args: tuple
  kwargs: dict
  note: str = ""


def programs(config, arch, n: int, mesh, tokenizer=None) -> list[Program]:
  """Every program a round of `config` runs, with abstract inputs placed on `mesh`."""
  from single_multi import fused, rows, spec as spec_lib

  dtype = jnp.dtype(config.dtype)
  params = pools.abstract_pool(arch, n, mesh, dtype)
  B, P, M = config.batch_size, int(config.compile_prompt_length), config.max_new_tokens
  P = decoding.bucket_length(P)
  note = ""
  if tokenizer is None:
    tokenizer, note = _LengthTokenizer(), "templates' lengths estimated (no tokenizer loaded)"
  stand_in = pool_lib.Pool(arch, params, tuple(f"m{i}" for i in range(n)), tokenizer)
  dcfg = spec_lib.distill_config(config)
  method = rows.method(dcfg.method)
  scfg = spec_lib.strategy_config(config)
  # The decode loops as an accelerator runs them, over stacked layers (this CPU host's default
  # would trace them over per-layer arrays, `decoding.unstack_for_loop`).
  env = dataclasses.replace(collab.make_env(stand_in, config.strategy, scfg, max_new_tokens=M,
                                            sampler=spec_lib.sampler_of(config),
                                            return_rows=method.returns_rows), unstack=False)
  prompt, mask = rows_struct(mesh, (B, P)), rows_struct(mesh, (B, P))
  batch = collab.Batch(prompt, mask, rows_struct(mesh, (B, P)), rows_struct(mesh, (B, P)))
  rng = key_struct(mesh, B)
  # Generated answers: evaluate prefills the head every prompt shares (the chat template's, the
  # task's instruction) once and decodes each row's rest after it (`pipeline.shared_prefix`);
  # planned with half the prompt bucket as the head.
  Pp = P // 2
  rest = rows_struct(mesh, (B, P - Pp))
  head = jax.ShapeDtypeStruct((Pp,), jnp.int32, sharding=sharding.named(mesh, (Pp,), (None,)))
  out = [Program("singles_decode", pool_lib.decode_each, (params, prompt, mask, rng),
                 dict(sampler=env.sampler, **env.decode_kw)),
         Program("singles_decode_head", pool_lib.decode_each, (params, rest, rest, rng),
                 dict(sampler=env.sampler, prefix_p=head, **env.decode_kw),
                 f"a shared head of {Pp} tokens prefilled once, then {P - Pp} per row")]
  spec = collab.get(config.strategy)
  c_note = note if spec.templates else ""
  if spec.fit is not None:
    c_note = (f"{config.strategy} is fitted on dev: planned without its fitted state "
              "(the state's own arrays are not counted)")
  out.append(Program("collaboration", collab._run, (params, batch, rng, None),
                     dict(name=config.strategy, cfg=scfg, env=env), c_note))
  # One distillation step: per_step rows of prompt + output (+ the eos the rows end with).
  per_step = dcfg.batch_size * dcfg.optim.accumulation
  per_model = rows.per_model(dcfg)
  lead = (n,) if per_model else ()
  T = P + M
  data = {k: rows_struct(mesh, lead + (per_step, T), pool=per_model)
          for k in ("tokens", "mask", "loss_mask")}
  tail = rows.traced_tail(method, M)
  if method.teacher:
    data["teacher"] = rows_struct(mesh, lead + (per_step, M, arch.vocab_size), jnp.float32,
                                  pool=per_model)
  trainable, opt, optimizer, t_shard = pools.abstract_training(arch, n, mesh, params, dcfg, 1000)
  shardings = lambda tree: jax.tree.map(lambda s: s.sharding, tree)  # noqa: E731
  place = distill.Placement(mesh, None if dcfg.lora is None else shardings(params), t_shard,
                            shardings(opt), shardings(data))
  step = distill.make_pool_step(distill.make_loss(arch, dcfg.method, dcfg.lora, tail), optimizer,
                                dcfg.optim.accumulation, per_model, place)
  key_data = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=place.replicated)
  t_note = (f"{dcfg.batch_size} x {dcfg.optim.accumulation} rows x {T} tokens, {dcfg.method}, "
            + (f"LoRA r={dcfg.lora.rank}" if dcfg.lora else "full"))
  spread = math.prod(mesh.shape[a] for a in sharding.RULES["batch"])
  if spread > 1 and dcfg.batch_size % spread:
    t_note += (f"; a micro-batch of {dcfg.batch_size} row(s) does not split over the {spread} "
               "devices of the batch axes: they hold its activations whole")
  out.append(Program("train_step", step, (trainable, opt, None if dcfg.lora is None else params,
                                          data, key_data), {}, t_note))
  if config.get("fused_round"):
    R, Q = config.dev_examples, config.test_examples
    dev = collab.Batch(*(rows_struct(mesh, (R, P)) for _ in range(4)))
    test = collab.Batch(*(rows_struct(mesh, (Q, P)) for _ in range(4)))
    steps = distill.num_steps(R, dcfg)
    order = jax.ShapeDtypeStruct((steps, per_step), jnp.int32, sharding=place.replicated)
    eos = env.stop_ids[0] if env.stop_ids else 0
    keys = {"dev_collab": key_struct(mesh, R), "policy": key_struct(mesh, R),
            "test_singles": key_struct(mesh, Q), "test_collab": key_struct(mesh, Q)}
    out.append(Program("round", fused.round_program, (params, dev, test, order, keys, None),
                       dict(strategy=config.strategy, cfg=scfg, env=env, dcfg=dcfg, eos=eos,
                            evaluate_test=True, policy_sampler=spec_lib.policy_sampler(config)),
                       f"{R} dev rows, {Q} test rows, {steps} optimizer steps"
                       + ("; without multi_student_kd's own-answer rows"
                          if dcfg.method == "multi_student_kd" else "")))
  return out


def log_dir() -> pathlib.Path:
  """Where libtpu writes its log (its compiler's warnings go there, not to stderr)."""
  return pathlib.Path(os.environ.get("TPU_LOG_DIR", "/tmp/tpu_logs"))


def warnings_since(offsets: dict[str, int] | None = None) -> tuple[list[str], dict[str, int]]:
  """The lines this process's libtpu WARNING log gained since `offsets` (None: since it began),
  and the new offsets."""
  offsets = dict(offsets or {})
  lines = []
  for path in sorted(log_dir().glob(f"*.log.WARNING.*.{os.getpid()}")):
    with open(path, "rb") as f:
      f.seek(offsets.get(str(path), 0))
      data = f.read()
      offsets[str(path)] = f.tell()
    lines += data.decode(errors="replace").splitlines()
  return lines, offsets


def _replicated_args(program: Program, compiled) -> list[dict[str, Any]]:
  leaves = jax.tree_util.tree_leaves_with_path((program.args, program.kwargs))
  shardings = jax.tree.leaves(compiled.input_shardings,
                              is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  out = []
  if len(shardings) != len([x for _, x in leaves if isinstance(x, jax.ShapeDtypeStruct)]):
    return out
  structs = [(p, x) for p, x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
  for (path, leaf), sh in zip(structs, shardings):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # Sampling keys: a few bytes.
      continue
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize if leaf.shape else 0
    if nbytes >= BIG and sh.is_fully_replicated and len(sh.device_set) > 1:
      out.append({"array": jax.tree_util.keystr(path), "shape": list(leaf.shape),
                  "bytes": nbytes})
  return out


def _does_not_fit(program: Program, error: str, hbm_bytes: float, seconds: float):
  """The TPU compiler refuses a program that cannot fit ("Ran out of memory on HBM ... required
  for HLO temporaries (323.43G) exceeds available HBM (15.75G)"): its own figures, in GiB."""
  found = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", error)
  temp = float(found.group(1)) * 2 ** 30 if found else float("nan")
  return {"name": program.name, "note": program.note,
          "bytes_per_device": {"argument": None, "output": None, "alias": None, "temp": temp,
                               "total": temp},
          "flops": None, "bytes_accessed": None, "hbm_fraction": temp / hbm_bytes, "fits": False,
          "compile_seconds": round(seconds, 2), "replicated": [], "rematerializations": [],
          "compiler_error": error.strip().splitlines()[0][:500]}


def compile_program(program: Program, mesh, hbm_bytes: float) -> dict[str, Any]:
  t0 = time.perf_counter()
  _, offsets = warnings_since()
  with jax.set_mesh(mesh):
    lowered = program.fn.lower(*program.args, **program.kwargs)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return _does_not_fit(program, str(e), hbm_bytes, time.perf_counter() - t0)
  seconds = time.perf_counter() - t0
  log, _ = warnings_since(offsets)
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  arg, outb, temp = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                     int(mem.temp_size_in_bytes))
  alias = int(mem.alias_size_in_bytes)  # Donated inputs the outputs reuse: counted once.
  total = arg + outb - alias + temp
  remat = [line.strip() for line in log if REMAT.search(line)]
  return {"name": program.name, "note": program.note,
          "bytes_per_device": {"argument": arg, "output": outb, "alias": alias, "temp": temp,
                               "total": total},
          "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get(
              "bytes accessed", 0.0)), "hbm_fraction": total / hbm_bytes,
          "fits": total <= hbm_bytes, "compile_seconds": round(seconds, 2),
          "replicated": _replicated_args(program, compiled), "rematerializations": remat}


# -------------------------------------------------------------------------------------------------
# The plan.


def _size(x: float) -> str:
  return f"{x / 2 ** 30:.2f} GiB" if x >= 2 ** 30 else f"{x / 2 ** 20:.1f} MiB"


def _line(r: dict[str, Any]) -> str:
  b, note = r["bytes_per_device"], f"  [{r['note']}]" if r["note"] else ""
  if r.get("compiler_error"):
    return (f"  {r['name']:15s} DOES NOT FIT: the TPU compiler needs {_size(b['temp'])} of "
            f"temporaries per device ({r['hbm_fraction']:.0%} of HBM); compiled in "
            f"{r['compile_seconds']:.1f} s{note}")
  return (f"  {r['name']:15s} arguments {_size(b['argument'])}, outputs {_size(b['output'])}, "
          f"temporaries {_size(b['temp'])}: total {_size(b['total'])} per device "
          f"({r['hbm_fraction']:.0%} of HBM, {'fits' if r['fits'] else 'DOES NOT FIT'}); "
          f"{r['flops'] / 1e12:.3g} TFLOP, {r['bytes_accessed'] / 1e9:.3g} GB accessed; "
          f"compiled in {r['compile_seconds']:.1f} s{note}")


def plan(config, workdir=None, print_fn=print) -> dict[str, Any]:
  """Compiles every program of a round for `config.compile_topology`; prints the table and writes
  `<workdir>/compile_plan.json`. Returns the plan."""
  topo = topology(config.compile_topology)
  archs = [pools.architecture(s) for s in config.pool]
  if any(a != archs[0] for a in archs[1:]):
    raise pool_lib.PoolMismatchError("the plan compiles a stacked pool: the sources differ in "
                                     "architecture")
  arch, n = archs[0], len(archs)
  mesh = sharding.make_mesh(dict(config.mesh), devices=topo.devices)
  tok = _tokenizer(config.pool[0]) if collab.get(config.strategy).templates else None
  progs = programs(config, arch, n, mesh, tok)
  print_fn(f"Compiling {len(progs)} programs for {topo.name} ({len(topo.devices)} devices, "
           f"{topo.chips} chips, {topo.hbm_bytes / 1e9:.1f} GB HBM per device), mesh "
           f"{dict(mesh.shape)}: {n} x {arch.model_type} (hidden {arch.hidden_size}, "
           f"{arch.num_layers} layers), {config.dtype}, batch {config.batch_size}, prompt "
           f"{decoding.bucket_length(int(config.compile_prompt_length))}, max_new_tokens "
           f"{config.max_new_tokens}")
  results = []
  for p in progs:
    r = compile_program(p, mesh, topo.hbm_bytes)
    results.append(r)
    print_fn(_line(r))
    for rep in r["replicated"]:
      print_fn(f"    replicated on every device: {rep['array']} {rep['shape']} "
               f"({rep['bytes'] / 2 ** 20:.1f} MiB)")
    for line in r["rematerializations"]:
      print_fn(f"    involuntary full rematerialization: {line[:300]}")
  peak = max(results, key=lambda r: r["hbm_fraction"])
  fits = all(r["fits"] for r in results)
  summary = (f"fits on {topo.name}: {'yes' if fits else 'no'}, peak "
             f"{peak['hbm_fraction']:.0%} of HBM, in the {peak['name'].replace('_', ' ')}")
  print_fn(summary)
  out = {"topology": topo.name, "devices": len(topo.devices), "chips": topo.chips,
         "hbm_bytes_per_device": topo.hbm_bytes, "mesh": dict(mesh.shape),
         "fits": fits, "summary": summary, "programs": results}
  if workdir is not None:
    from etils import epath
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "compile_plan.json").write_text(json.dumps(out, indent=1))
    print_fn(f"wrote {path / 'compile_plan.json'}")
  return out
