"""Reward models: the sequence-classification head against transformers'
LlamaForSequenceClassification (a tiny random checkpoint), both ways, and batched scoring."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import left_padded_batch, torch, transformers

from single_multi import reward
from single_multi.models import loading, tiny, transformer

TOL = 1e-4  # fp32, fixed in advance (as every parity test here).


def _hf_classifier(vocab=160, seed=0):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
      tie_word_embeddings=False)
  model = transformers.LlamaForSequenceClassification(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.15) if p.dim() > 1 else p.uniform_(-0.5, 0.5)
  return model


def test_sequence_scores_match_transformers_classifier(tmp_path):
  hf = _hf_classifier()
  hf.save_pretrained(tmp_path / "rm")
  ours = loading.load(str(tmp_path / "rm"), tokenizer=False)
  assert ours.config.num_labels == 1 and "lm_head" not in ours.params
  ids, mask = left_padded_batch(3)
  ids = np.where(mask > 0, np.maximum(ids, 1), 0)  # Pad id 0 only on padding.
  # Left padding: HF with generate's position ids (cumsum(mask) - 1).
  pos = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos)).logits.numpy()
  got = np.asarray(transformer.sequence_scores(ours.params, jnp.asarray(ids), ours.config,
                                               mask_bt=jnp.asarray(mask)))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  # Right padding: HF picks the last non-pad token itself.
  right_ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, mask)])
  right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
  with torch.no_grad():
    want_r = hf(input_ids=torch.tensor(right_ids),
                attention_mask=torch.tensor(right_mask)).logits.numpy()
  got_r = np.asarray(transformer.sequence_scores(ours.params, jnp.asarray(right_ids), ours.config,
                                                 mask_bt=jnp.asarray(right_mask)))
  np.testing.assert_allclose(got_r, want_r, atol=TOL, rtol=0)
  np.testing.assert_allclose(got_r, got, atol=TOL, rtol=0)  # Padding side changes nothing.


def test_classifier_round_trips_through_save_hf(tmp_path):
  hf = _hf_classifier(seed=1)
  hf.save_pretrained(tmp_path / "rm")
  ours = loading.load(str(tmp_path / "rm"), tokenizer=False)
  loading.save_hf(tmp_path / "back", ours.config, ours.params)
  again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back").eval()
  ids = torch.tensor([[5, 9, 33, 2, 7]])
  with torch.no_grad():
    np.testing.assert_allclose(again(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy(),
                               atol=TOL, rtol=0)


def test_reward_scores_are_batch_invariant_and_match_transformers(tmp_path):
  hf = _hf_classifier(vocab=tiny.CONFIG.vocab_size, seed=2)
  hf.save_pretrained(tmp_path / "rm")
  m = loading.load(str(tmp_path / "rm"), tokenizer=False)
  model = loading.Model(m.config, m.params, tiny.ByteTokenizer(), "rm")
  prompts, replies = ["Hi?", "A longer question here?", "Q"], ["Yes.", "No", "a much longer reply"]
  batched = reward.scores(model, prompts, replies, batch_size=2)
  for p, r, got in zip(prompts, replies, batched):
    text = f"<user>{p}</><assistant>{r}</>"  # ByteTokenizer's template.
    ids = torch.tensor([[2 + b for b in text.encode()]])
    with torch.no_grad():
      assert got == pytest.approx(float(hf(input_ids=ids).logits[0, 0]), abs=TOL)
  with pytest.raises(ValueError, match="2 replies"):
    reward.scores(model, prompts, replies[:2])


def test_a_causal_lm_is_refused_as_reward_model(tmp_path):
  with pytest.raises(ValueError, match="sequence classifier"):
    transformer.sequence_scores(tiny.model(0).params, jnp.zeros((1, 3), jnp.int32), tiny.CONFIG)


def test_reward_task_rows_are_scored_by_the_reward_model(tmp_path):
  from single_multi import evaluate
  from single_multi.data import common, pipeline

  hf = _hf_classifier(vocab=tiny.CONFIG.vocab_size, seed=3)
  hf.save_pretrained(tmp_path / "rm")
  m = loading.load(str(tmp_path / "rm"), tokenizer=False)
  rm = loading.Model(m.config, m.params, tiny.ByteTokenizer(), "rm")
  exs = [common.Example(f"human_interest/test/{i}", "human_interest", f"Why {i}?",
                        targets=("a sample",)) for i in range(3)]
  prompter = pipeline.Prompter(tiny.ByteTokenizer(), pipeline.PromptConfig(style="moco"))
  result = evaluate.evaluate(tiny.model(0), exs, prompter=prompter, metric="moco",
                             max_new_tokens=4, progress=False, reward_model=rm)
  want = reward.scores(rm, [e.question for e in exs], [r["output"] for r in result.records])
  assert [r["score"] for r in result.records] == pytest.approx(want, abs=1e-6)
  assert result.summary["models"]["tiny0"]["score"]["mean"] == pytest.approx(np.mean(want))
  with pytest.raises(ValueError, match="reward model"):  # None given: refused before decoding.
    evaluate.evaluate(tiny.model(0), exs, prompter=prompter, metric="moco", progress=False)


def test_reward_load_refuses_a_causal_lm(hf_dir):
  _, path = hf_dir("llama_gqa_untied")
  with pytest.raises(loading.LoadError, match="not a reward model"):
    reward.load(str(path), dtype="float32")
