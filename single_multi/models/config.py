"""ModelConfig: one frozen description of a decoder-only LM, built from HF config.json or GGUF metadata.

The config is hashable so it can be a static argument of `jax.jit`. Family differences that the
forward pass needs (biases, Gemma's norm offset and embedding scale, activation, per-layer sliding
windows, RoPE scaling) are explicit fields rather than `if family == ...` branches in the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")

# The dense projections of a layer as einsum letters: name -> (input letters, output letters);
# the weight is laid out input+output (D model width, N/K query/kv heads, H head dim, F MLP width).
PROJECTIONS = {
    "q": ("D", "NH"), "k": ("D", "KH"), "v": ("D", "KH"), "o": ("NH", "D"),
    "gate": ("D", "F"), "up": ("D", "F"), "down": ("F", "D"),
}


def dim_sizes(config: "ModelConfig") -> dict[str, int]:
  """Size of each shape letter (see PROJECTIONS) for this architecture."""
  c = config
  return {"L": c.num_layers, "D": c.hidden_size, "N": c.num_heads, "K": c.num_kv_heads,
          "H": c.head_dim, "F": c.intermediate_size, "V": c.vocab_size, "C": c.num_labels}


def param_layout(config: "ModelConfig") -> dict[str, Any]:
  """Every parameter as its string of shape letters (the one description of the param tree)."""
  layers = {"attn_norm": "LD", "q": "LDNH", "k": "LDKH", "v": "LDKH", "o": "LNHD", "mlp_norm": "LD",
            "gate": "LDF", "up": "LDF", "down": "LFD"}
  if config.qkv_bias:
    layers.update(q_bias="LNH", k_bias="LKH", v_bias="LKH")
  if config.o_bias:
    layers["o_bias"] = "LD"
  if config.mlp_bias:
    layers.update(gate_bias="LF", up_bias="LF", down_bias="LD")
  layout = {"embed": "VD", "layers": layers, "final_norm": "D"}
  if config.num_labels:  # A sequence classifier (reward model): a score head, no LM head.
    layout["score"] = "DC"
  elif not config.tie_word_embeddings:
    layout["lm_head"] = "DV"
  return layout


def _hf_num_labels(hf: Mapping[str, Any]) -> int:
  """Labels of a *ForSequenceClassification checkpoint (id2label, else num_labels); 0 otherwise."""
  if not any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
    return 0
  return len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))


class UnsupportedModelError(ValueError):
  """The checkpoint describes an architecture or feature this codebase does not implement."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama / Mistral / Qwen2 / Gemma decoder (HF semantics)."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  activation: str = "silu"
  qkv_bias: bool = False  # Qwen2 always; Llama/Gemma with attention_bias.
  o_bias: bool = False  # Llama/Gemma attention_bias also biases o_proj.
  mlp_bias: bool = False
  norm_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), computed in fp32.
  scale_embeddings: bool = False  # Gemma: embeddings * sqrt(hidden_size), rounded to the dtype.
  # RoPE (HF rotate-half layout).
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  # Per-layer sliding attention window; 0 means full causal attention.
  sliding_windows: tuple[int, ...] = ()
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # > 0: a sequence classifier (HF *ForSequenceClassification, e.g. a reward model): `score`
  # [D, num_labels] on the last real token's hidden state replaces the LM head.
  num_labels: int = 0

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
          f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise UnsupportedModelError(
          f"rope type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if self.activation not in _ACTIVATIONS:
      raise UnsupportedModelError(
          f"activation {self.activation!r} is not supported; supported: {_ACTIVATIONS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if not self.sliding_windows:
      object.__setattr__(self, "sliding_windows", (0,) * self.num_layers)
    if len(self.sliding_windows) != self.num_layers:
      raise ValueError(
          f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers")

  # ---------------------------------------------------------------------------------------------
  # Derived quantities.

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def inv_freq(self) -> np.ndarray:
    """RoPE inverse frequencies [H/2], computed in float32 exactly as HF's rope init functions."""
    dim = self.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(self.rope_theta) ** exponent)).astype(np.float32)
    if self.rope_type == "linear":
      inv_freq = (inv_freq / np.float32(self.rope_factor)).astype(np.float32)
    elif self.rope_type == "llama3":
      factor = self.rope_factor
      old_len = self.rope_original_max_position
      low_wavelen = old_len / self.rope_low_freq_factor
      high_wavelen = old_len / self.rope_high_freq_factor
      wavelen = (2 * math.pi / inv_freq).astype(np.float32)
      scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
      smooth = ((old_len / wavelen - self.rope_low_freq_factor) /
                (self.rope_high_freq_factor - self.rope_low_freq_factor)).astype(np.float32)
      smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq

  def num_params(self) -> int:
    d, f, h, v = self.hidden_size, self.intermediate_size, self.head_dim, self.vocab_size
    attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d

  # ---------------------------------------------------------------------------------------------
  # Hugging Face config.json.

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
    """Builds the config from an HF `config.json` dict (transformers 4 and 5 layouts)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
          f"unknown architecture: model_type={model_type!r}, "
          f"architectures={hf.get('architectures')}; supported model types: {SUPPORTED_MODEL_TYPES}")
    try:
      num_heads = hf["num_attention_heads"]
      hidden = hf["hidden_size"]
      num_layers = hf["num_hidden_layers"]
      vocab_size = hf["vocab_size"]
      intermediate = hf["intermediate_size"]
    except KeyError as e:
      raise ValueError(f"config.json lacks the required field {e.args[0]!r}") from None
    head_dim = hf.get("head_dim") or hidden // num_heads
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
      raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    activation = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
    if model_type == "gemma" and activation == "gelu":
      activation = "gelu_pytorch_tanh"  # HF remaps Gemma's legacy "gelu" to the tanh approximation.
    attention_bias = bool(hf.get("attention_bias", False))
    windows = _hf_sliding_windows(model_type, hf, num_layers)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    return cls(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", model_type == "gemma"),
        activation=activation,
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        norm_offset=model_type == "gemma",
        scale_embeddings=model_type == "gemma",
        rope_theta=float(rope_theta),
        rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        # Read by llama3 scaling only; otherwise the dataclass default, so that a config that
        # went through save_hf compares equal to the one it came from.
        rope_original_max_position=int(
            rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)))
        if rope_type == "llama3" else 8192,
        sliding_windows=windows,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        num_labels=_hf_num_labels(hf),
    )

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict; transformers builds the same architecture from it."""
    arch = {"llama": "LlamaFor", "mistral": "MistralFor", "qwen2": "Qwen2For",
            "gemma": "GemmaFor"}[self.model_type]
    arch += "SequenceClassification" if self.num_labels else "CausalLM"
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": self.activation,
        "rope_theta": self.rope_theta,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                        else self.eos_token_ids[0],
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type != "qwen2":
      if self.qkv_bias != self.o_bias:
        raise UnsupportedModelError(
            f"{self.model_type} has one attention_bias flag for q/k/v/o; cannot express "
            f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias} in config.json")
      hf["attention_bias"] = self.qkv_bias
    if self.model_type in ("llama", "mistral"):
      hf["mlp_bias"] = self.mlp_bias
    if self.rope_type != "default":
      hf["rope_scaling"] = {"rope_type": self.rope_type, "factor": self.rope_factor}
      if self.rope_type == "llama3":
        hf["rope_scaling"].update(
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_position_embeddings=self.rope_original_max_position)
    hf.update(_hf_sliding_fields(self))
    if self.num_labels:
      hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
    return hf

  # ---------------------------------------------------------------------------------------------
  # GGUF metadata (llama.cpp).

  @classmethod
  def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> "ModelConfig":
    """Builds the config from GGUF key/values (as plain Python values) and the tensor names."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "gemma"):
      raise UnsupportedModelError(
          f"unknown GGUF architecture {arch!r}; supported: ('llama', 'qwen2', 'gemma')")
    if "rope_freqs.weight" in tensor_names:
      raise UnsupportedModelError(
          "GGUF file carries per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 style); "
          "load the HF safetensors checkpoint instead")

    def get(key, default=None, required=False):
      full = f"{arch}.{key}"
      if required and full not in meta:
        raise ValueError(f"GGUF metadata lacks the required key {full!r}")
      return meta.get(full, default)

    hidden = int(get("embedding_length", required=True))
    num_heads = int(get("attention.head_count", required=True))
    num_layers = int(get("block_count", required=True))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
      raise ValueError("GGUF metadata gives no vocabulary size")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
      raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
    window = int(get("attention.sliding_window", 0) or 0)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return cls(
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        activation="gelu_pytorch_tanh" if arch == "gemma" else "silu",
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        norm_offset=arch == "gemma",
        scale_embeddings=arch == "gemma",
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_type="linear" if scaling == "linear" else "default",
        rope_factor=float(get("rope.scaling.factor", 1.0)),
        sliding_windows=(window,) * num_layers,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _hf_sliding_windows(model_type: str, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
  """Per-layer windows following each family's HF rules (0 = full attention)."""
  window = hf.get("sliding_window")
  if model_type == "mistral":
    return ((window or 0),) * num_layers
  if model_type == "qwen2":
    layer_types = hf.get("layer_types")
    if layer_types is None:
      use = hf.get("use_sliding_window", False) and window
      start = hf.get("max_window_layers", 28)
      layer_types = ["sliding_attention" if use and i >= start else "full_attention"
                     for i in range(num_layers)]
    return tuple((window or 0) if t == "sliding_attention" else 0 for t in layer_types)
  return (0,) * num_layers


def _hf_sliding_fields(config: ModelConfig) -> dict[str, Any]:
  windows = set(config.sliding_windows)
  if windows == {0}:
    return {"sliding_window": None, "use_sliding_window": False} if config.model_type in (
        "mistral", "qwen2") else {}
  if config.model_type == "mistral" and len(windows) == 1:
    return {"sliding_window": windows.pop()}
  if config.model_type == "qwen2" and len(windows - {0}) == 1:
    w = (windows - {0}).pop()
    return {"use_sliding_window": True, "sliding_window": w,
            "layer_types": ["sliding_attention" if x else "full_attention"
                            for x in config.sliding_windows]}
  raise UnsupportedModelError(
      f"{config.model_type} cannot express per-layer windows {config.sliding_windows} in config.json")
