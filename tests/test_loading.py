"""Save/reload round trips, GGUF conversion conventions, and clear errors on bad checkpoints."""

import json
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hf_logits, left_padded_batch, make_hf_model, transformers
from safetensors.numpy import load_file, save_file

import single_multi as sm
from single_multi.models.config import UnsupportedModelError

FP32_TOL = 1e-4


def _logits(model, ids, mask):
  return np.asarray(sm.forward(model.params, jnp.asarray(ids), model.config,
                               mask_bt=jnp.asarray(mask))[0])


# -------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("name", ["llama3_rope_tied_bias", "qwen2_sliding_layers", "gemma",
                                  "mistral_sliding"])
@pytest.mark.parametrize("shard_bytes", [4 << 30, 20_000])
def test_save_reload_is_bit_identical_and_transformers_reads_it(name, shard_bytes, hf_dir, tmp_path):
  ref_model, path = hf_dir(name)
  model = sm.load(str(path), tokenizer=False)
  out = sm.save_hf(tmp_path / "saved", model.config, model.params, max_shard_bytes=shard_bytes)
  assert (out / "model.safetensors.index.json").exists() == (shard_bytes < 4 << 30)
  again = sm.load(str(out), tokenizer=False)
  assert again.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
  # transformers builds the same model from our config.json + safetensors.
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  ids, mask = left_padded_batch(seed=7, length=40)
  real = mask.astype(bool)
  assert np.abs(hf_logits(theirs, ids, mask) - hf_logits(ref_model, ids, mask))[real].max() \
      <= FP32_TOL


def test_bf16_save_reload_is_bit_identical(hf_dir, tmp_path):
  _, path = hf_dir("qwen2_untied")
  model = sm.load(str(path), dtype=jnp.bfloat16, tokenizer=False)
  out = sm.save_hf(tmp_path / "bf16", model.config, model.params)
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  again = sm.load(str(out), dtype=jnp.bfloat16, tokenizer=False)
  jax.tree.map(np.testing.assert_array_equal, again.params, model.params)


# -------------------------------------------------------------------------------------------------
# GGUF: files written with llama.cpp's conventions load back to the HF model.


def _write_gguf(hf_model, path, arch):
  """Writes an HF model as llama.cpp's converter would (q/k permuted for llama, gemma norms + 1)."""
  c = hf_model.config
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(head_dim)
  w.add_value_length(head_dim)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
  layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  for key, tensor in hf_model.state_dict().items():
    if key == "lm_head.weight" and c.tie_word_embeddings:
      continue
    arr = tensor.float().numpy().copy()
    stem, kind = key.rsplit(".", 1)
    if stem.startswith("model.layers."):
      _, _, i, rest = stem.split(".", 3)
      name = f"blk.{i}.{layer[rest]}.{kind}"
    else:
      name = f"{names[stem]}.{kind}"
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = c.num_attention_heads if "attn_q" in name else c.num_key_value_heads
      arr = arr.reshape(heads, 2, arr.shape[0] // heads // 2, *arr.shape[1:]).swapaxes(1, 2)
      arr = arr.reshape(tensor.shape)
    if arch == "gemma" and name.endswith("norm.weight"):
      arr = arr + 1
    w.add_tensor(name, np.ascontiguousarray(arr))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("name,arch", [("llama_gqa_untied", "llama"), ("qwen2_untied", "qwen2"),
                                       ("gemma", "gemma")])
def test_gguf_written_like_llama_cpp_matches_transformers(name, arch, tmp_path):
  ref_model = make_hf_model(name)
  path = tmp_path / f"{name}.gguf"
  _write_gguf(ref_model, path, arch)
  model = sm.load(str(path), tokenizer=False)
  assert model.config.tie_word_embeddings == ref_model.config.tie_word_embeddings
  assert model.config.qkv_bias == (arch == "qwen2")
  ids, mask = left_padded_batch(seed=8, length=24)
  real = mask.astype(bool)
  assert np.abs(_logits(model, ids, mask) - hf_logits(ref_model, ids, mask))[real].max() <= FP32_TOL


def test_truncated_gguf_is_reported(tmp_path):
  path = tmp_path / "m.gguf"
  _write_gguf(make_hf_model("llama_gqa_untied"), path, "llama")
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 1000])
  with pytest.raises(sm.LoadError, match=r"m\.gguf is truncated: tensor '.*'"):
    sm.load(str(path), tokenizer=False)
  path.write_bytes(b"NOPE" + data[4:200])
  with pytest.raises(sm.LoadError, match="not a GGUF file"):
    sm.load(str(path), tokenizer=False)


# -------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the file / tensor.


def _rewrite(path, edit):
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"))


def test_unknown_architecture(hf_dir):
  _, path = hf_dir("llama_gqa_untied")
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2'.*GPT2LMHeadModel.*supported"):
    sm.load(str(path), tokenizer=False)


def test_missing_tensor(hf_dir):
  _, path = hf_dir("qwen2_untied")
  _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(sm.LoadError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
    sm.load(str(path), tokenizer=False)


def test_wrong_shape(hf_dir):
  _, path = hf_dir("llama_gqa_untied")
  _rewrite(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((95, 64),
                                                                                   np.float32)}))
  with pytest.raises(sm.LoadError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape "
                                         r"\(95, 64\), the config implies \(96, 64\)"):
    sm.load(str(path), tokenizer=False)


def test_unexpected_tensor(hf_dir):
  _, path = hf_dir("gemma")
  _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(sm.LoadError, match=r"not used .*model\.layers\.0\.extra\.weight"):
    sm.load(str(path), tokenizer=False)


def test_nonexistent_paths():
  with pytest.raises(sm.LoadError, match="/no/such/dir"):
    sm.load("/no/such/dir", tokenizer=False)
  with pytest.raises(sm.LoadError, match=r"GGUF file /no/such\.gguf does not exist"):
    sm.load("/no/such.gguf", tokenizer=False)


def test_directory_without_config_or_weights(hf_dir):
  _, path = hf_dir("gemma")
  (path / "model.safetensors").unlink()
  with pytest.raises(sm.LoadError, match=r"no \*\.safetensors weights in"):
    sm.load(str(path), tokenizer=False)
  (path / "config.json").unlink()
  with pytest.raises(sm.LoadError, match="has no config.json"):
    sm.load(str(path), tokenizer=False)


def test_truncated_safetensors(hf_dir):
  _, path = hf_dir("llama_gqa_untied")
  f = path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-4096])
  with pytest.raises(sm.LoadError, match=r"cannot read safetensors file .*model\.safetensors"):
    sm.load(str(path), tokenizer=False)


def test_missing_shard(hf_dir, tmp_path):
  _, path = hf_dir("qwen2_untied")
  model = sm.load(str(path), tokenizer=False)
  out = sm.save_hf(tmp_path / "sharded", model.config, model.params, max_shard_bytes=20_000)
  victim = sorted(out.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(sm.LoadError, match=f"names the shard {victim.name}, which does not exist"):
    sm.load(str(out), tokenizer=False)


def test_hub_source_fails_fast_offline(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  start = time.monotonic()
  with pytest.raises(sm.LoadError, match=r"hf:single-multi/nonexistent-model.*directory path"):
    sm.load("hf:single-multi/nonexistent-model", tokenizer=False)
  assert time.monotonic() - start < 30  # No retry loop (generous bound; it takes milliseconds).


def test_unknown_source_string():
  with pytest.raises(sm.LoadError, match="neither an existing directory nor a .gguf file"):
    sm.load("not-a-model", tokenizer=False)
  with pytest.raises(Exception, match="unknown embedded model 'nope'"):
    sm.load("embedded:nope", tokenizer=False)
