"""Shared fixtures: tiny random HF torch models (the reference) saved to temp dirs."""

import os

# Before JAX initialises: deterministic CPU numerics for parity tests.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 160

# Configurations chosen to cover the HF semantics that differ between families and checkpoints:
# GQA ratios, head_dim != hidden/heads, tied/untied embeddings, q/k/v(/o) biases, MLP biases,
# Llama-3 and linear RoPE scaling, sliding windows, Gemma's norm/embedding/activation.
TINY_CONFIGS = {
    "llama_gqa_untied": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
        rope_theta=500.0),
    "llama3_rope_tied_bias": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_theta=50000.0, max_position_embeddings=512, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_linear_rope_mha": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "mistral_sliding": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    "qwen2_untied": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2_tied_mha": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_sliding_layers": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
        max_window_layers=1),
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32),
}


def make_hf_model(name: str, seed: int = 0, dtype=None):
  """A tiny HF causal LM with random weights large enough to make every term matter."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      TINY_CONFIGS[name](), attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() > 1:
        p.normal_(0.0, 0.15)
      else:  # norms and biases: non-trivial values so a wrong (1 + w) or missing bias shows.
        p.uniform_(-0.5, 0.5)
  model = model.eval()
  return model if dtype is None else model.to(dtype)


@pytest.fixture
def hf_dir(tmp_path):
  """Factory: (name, seed) -> (torch model, directory written by save_pretrained)."""

  def make(name, seed=0):
    model = make_hf_model(name, seed)
    path = tmp_path / f"{name}-{seed}"
    model.save_pretrained(path)
    return model, path

  return make


def left_padded_batch(seed: int, batch: int = 3, length: int = 24, vocab: int = VOCAB):
  """Random ids and a mask whose rows carry 0, 5 and 11 pad tokens on the left."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (batch, length)).astype(np.int64)
  mask = np.ones_like(ids)
  for row, pads in enumerate([0, 5, 11][:batch]):
    mask[row, :pads] = 0
  return ids, mask


def hf_logits(model, ids, mask):
  """HF logits with generate's position ids for left padding (cumsum(mask) - 1)."""
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs and traces after each test module.

  One pytest process runs ~290 tests; without this, every module's executables (and the
  constants traced into them) stay cached to the end, and the CI run on record died of a
  segfault inside XLA's compiler 27 minutes in, on a test that passes on its own.
  """
  yield
  import gc

  import jax
  jax.clear_caches()
  gc.collect()


# The BIG-bench tasks the loop tests name, as rows these tests write (BIG-bench's task.json
# format). The real files (the bigbench 1.0.0 sdist) are not always on the package index, and
# tests never depend on them: only tests/test_eval_real.py reads the real ones, and skips without.
REAL_BIGBENCH = os.environ.get("SINGLE_MULTI_BIGBENCH")


def _mc(question, options, correct):
  return {"input": question, "target_scores": {o: int(o == correct) for o in options}}


def bigbench_tree(root):
  """Writes <root>/benchmark_tasks/<task>/task.json for the tasks the tests name. Returns root."""
  import json
  import pathlib
  words = [f"{a}{b}{c}" for a in ("b", "d", "f", "k", "m", "p", "t", "z")
           for b in ("a", "e", "i", "o", "u") for c in ("g", "l", "n", "r")]  # 160 made-up stems.
  files = {
      # Multiple choice, the sum listed last as in BIG-bench's own arithmetic files.
      "arithmetic/1_digit_addition": [
          _mc(f"What is {a} plus {b}?", [str(a + b + 1), str(a + b + 2), str(abs(a - b) + 20),
                                          str(a + b)], str(a + b))
          for a in range(10) for b in range(10)],
      "arithmetic/2_digit_addition": [
          _mc(f"What is {a} plus {b}?", [str(a + b + 1), str(a + b + 10), str(a + b - 1),
                                          str(a + b)], str(a + b))
          for a in range(10, 100, 7) for b in range(10, 100, 9)],
      "sports_understanding": [
          _mc(f"Is the following sentence plausible? \"The {w} player scored a {s}.\"",
              ["plausible", "implausible"], "plausible" if s == "goal" else "implausible")
          for w in words[:40] for s in ("goal", "touchdown")],
      "navigate": [_mc(f"If you follow these instructions, do you return to the starting point? "
                       f"Take {n} steps. Turn around. Take {m} steps.", ["True", "False"],
                       str(n == m)) for n in range(1, 9) for m in range(1, 9)],
      "general_knowledge": [_mc(f"Which number comes after {n}?", [str(n - 1), str(n + 1),
                                                                   str(n + 10), str(2 * n + 5)],
                                str(n + 1)) for n in range(11, 71)],
      "linguistic_mappings/past_tense_json": [{"input": w, "target": w + "ed"} for w in words],
      "linguistic_mappings/plural_json": [{"input": w, "target": w + "s"} for w in words],
      "linguistic_mappings/sentence_negation_json": [
          {"input": f"The {w} is here.", "target": f"The {w} is not here."} for w in words],
  }
  for task, examples in files.items():
    path = pathlib.Path(root) / "benchmark_tasks" / task / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": task, "description": "written by tests/conftest.py",
                                "examples": examples}))
  return pathlib.Path(root)


@pytest.fixture(autouse=True, scope="session")
def _bigbench_rows(tmp_path_factory):
  """Every test (and the processes it starts) reads the rows above as its BIG-bench tasks."""
  root = bigbench_tree(tmp_path_factory.mktemp("bigbench"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("SINGLE_MULTI_BIGBENCH", str(root))
    yield root
