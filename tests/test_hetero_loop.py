"""The loop on a heterogeneous pool: two tiny Llamas and a tiny Qwen2 with another tokenizer and
chat template (configs/tiny_hetero.py) collaborate in text; each architecture group distils the
collaboration's answers tokenised its own way; kill after any stage resumes to the same records."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest
from configs_loader import (check_round_without_training_rows, dry_run_stdout,
                           killed_and_resumed, load_config)
from ml_collections import config_dict

from single_multi import collab, distill, evolve, hetero_loop, pool as pool_lib
from single_multi import workdir as wd
from single_multi.data import pipeline
from single_multi.models import tiny



@pytest.fixture(scope="module")
def groups(tmp_path_factory):
  from single_multi import pools
  built = pools.build(load_config("tiny_hetero.py"), tmp_path_factory.mktemp("pool"))
  assert isinstance(built, pool_lib.Groups)
  return built


def _config(**overrides):
  return load_config("tiny_hetero.py", **{"distill.epochs": 3.0, **overrides})


def test_members_are_grouped_by_architecture_and_tokenizer(groups):
  assert groups.names == ("tiny:0", "tiny-qwen2:0", "tiny:1")
  assert [p.names for p in groups.pools] == [("tiny:0", "tiny:1"), ("tiny-qwen2:0",)]
  assert [p.config.model_type for p in groups.pools] == ["llama", "qwen2"]
  # The two tokenizers share no id for the same text, and render chats differently.
  a, b = (p.tokenizer for p in groups.pools)
  assert set(a("7 plus 3")["input_ids"]).isdisjoint(b("7 plus 3")["input_ids"])
  with pytest.raises(pool_lib.PoolMismatchError, match="pool_kind='heterogeneous'"):
    pool_lib.load_pool(["tiny:0", "tiny-qwen2:0"])
  members = groups.members()
  assert [m.source for m in members] == list(groups.names)
  np.testing.assert_array_equal(members[2].params["embed"], groups.pools[0].params["embed"][1])
  again = groups.with_params(groups.params)
  assert again.names == groups.names and [p.names for p in again.pools] == [
      p.names for p in groups.pools]


def test_hetero_loop_runs_distils_every_group_and_resumes_after_each_stage(groups, tmp_path):
  c = _config()
  want = evolve.run(c, tmp_path / "whole", groups, progress=False)
  assert [m["round"] for m in want] == [0, 1]
  for m in want:
    assert set(m["singles"]) == set(groups.names) and 0 <= m["collab"] <= 1
  # Each group trained on its own rows; the loss over the same rows fell for every member.
  d = want[1]["distill"]
  assert sorted(d) == ["group0", "group1"]
  assert d["group0"]["models"] == ["tiny:0", "tiny:1"] and d["group1"]["models"] == ["tiny-qwen2:0"]
  for stats in d.values():
    assert all(b < a for a, b in zip(stats["first_epoch_loss"], stats["last_epoch_loss"])), stats
  whole = tmp_path / "whole"
  records = [json.loads(x) for x in
             (whole / "round_1" / "collaboration" / "records.jsonl").read_text().splitlines()]
  assert len(records) == 8 and {r["model"] for r in records} == {"multiagent_refine"}
  # Every member's answers in the first rounds of the exchange: 3 members, 1 refine round.
  assert all(len(r["answers"]) == 2 and len(r["answers"][0]) == 3 for r in records)
  # The checkpoint holds every member: both groups' stacked params, the Qwen2 group's qkv bias.
  ckpt = wd.Checkpoints(whole / "checkpoints", 2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 groups.params)
  params, _, meta = ckpt.restore(ckpt.latest(), abstract)
  ckpt.close()
  assert params["group0"]["embed"].shape[0] == 2 and params["group1"]["embed"].shape == (1, 300, 48)
  assert "q_bias" in params["group1"]["layers"] and "q_bias" not in params["group0"]["layers"]
  assert meta["history"] == want
  # Killed after every stage, rerun with the same command: the same history and records.
  stages = evolve.stage_list(c.rounds)
  assert len(stages) == 4
  for k, workdir, got in killed_and_resumed(c, groups, tmp_path):
    assert got == want, f"resumed after stage {k} ({stages[k]})"
    for part in ("singles", "collaboration"):
      name = pathlib.Path("round_1") / part / "records.jsonl"
      assert (workdir / name).read_text() == (whole / name).read_text(), (k, part)


def test_each_group_trains_on_the_collaboration_text_in_its_own_tokens(groups, tmp_path):
  """The rows a group distils are its own prompter's prompt, then the collaboration's dev answer
  in that group's tokenizer, then its eos; the loss covers exactly the answer and the eos."""
  c = _config()
  with pytest.raises(evolve.Interrupted):
    evolve.run(c, tmp_path, groups, progress=False, stop_after=1)  # After round 1 collaborate.
  ckpt = wd.Checkpoints(tmp_path / "checkpoints", 2)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 groups.params)
  _, arrays, meta = ckpt.restore(1, abstract)
  ckpt.close()
  assert meta["stage"] == "collaborate"
  loop = evolve.make_loop(c, groups, progress=False)
  answers = {json.loads(x)["id"]: json.loads(x)["output"] for x in (
      tmp_path / "round_1" / "collaboration_dev" / "records.jsonl").read_text().splitlines()}
  assert len(answers) == len(loop.dev) == 8
  for g, (p, prompter) in enumerate(zip(groups.pools, loop.prompters)):
    tokens, mask, loss = (arrays[f"group{g}{hetero_loop.SEP}{k}"]
                          for k in ("tokens", "mask", "loss_mask"))
    assert tokens.shape[0] == 8
    for k, ex in enumerate(loop.dev):
      row = tokens[k][mask[k] > 0].tolist()
      prompt = prompter.ids(ex)
      answer = p.tokenizer(answers[ex.id])["input_ids"] + [1]  # Both tiny tokenizers: eos 1.
      assert row == prompt + answer, (g, k)
      assert loss[k].sum() == len(answer) and loss[k][-len(answer):].all()
    # The prompt is the group's own chat template.
    rendered = p.tokenizer.decode(prompter.ids(loop.dev[0]))
    assert rendered.startswith("<user>" if g == 0 else "[user] "), rendered


def test_multi_student_rows_add_own_and_best_answers_per_member(groups, tmp_path):
  c = _config(**{"distill.method": "multi_student_kd", "distill.epochs": 1.0})
  history = evolve.run(c, tmp_path, groups, progress=False)
  assert history[1]["distill"]["group0"]["steps"] == 4  # 2R = 16 rows per member, batch 4.


def test_heterogeneous_refusals_come_before_anything_loads(monkeypatch):
  from single_multi import pools
  from single_multi.models import loading
  monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("validate loaded a model"))
  monkeypatch.setattr(pools, "build", lambda *a, **k: pytest.fail("validate built the pool"))
  refused = {}
  for name in collab.REGISTRY:
    for method in distill.METHODS:
      try:
        evolve.validate(_config(strategy=name, strategy_config=config_dict.ConfigDict(),
                                **{"distill.method": method}))
      except evolve.ConfigError as e:
        refused[name, method] = str(e)
  for combo, message in refused.items():
    assert re.search(r"\buse\b|\bset\b", message), (combo, message)
  runnable = {(s, m) for s in hetero_loop.STRATEGIES for m in hetero_loop.METHODS}
  assert runnable.isdisjoint(refused)
  assert len(refused) == len(collab.REGISTRY) * len(distill.METHODS) - len(runnable)
  assert "one vocabulary and one architecture" in refused["logit_fusion", "supervised_kd"]
  assert "hidden states" in refused["trained_router", "supervised_kd"]
  assert "per-token teacher rows" in refused["multiagent_refine", "logit_kd"]
  for overrides, message in [({"fused_round": True}, "set fused_round=False"),
                             ({"specialists": ("bigbench:navigate",)}, "set specialists=()"),
                             ({"pool_kind": "mixed"}, "pool_kind='mixed' is not allowed")]:
    with pytest.raises(evolve.ConfigError, match=re.escape(message)):
      evolve.validate(_config(**overrides))


def test_tiny_qwen2_family_differs_from_tiny_llama():
  a, b = tiny.model(0), tiny.qwen2_model(0)
  assert a.config.model_type == "llama" and b.config.model_type == "qwen2"
  assert b.config.qkv_bias and b.config.tie_word_embeddings and b.config.vocab_size == 300
  text = "ok é"
  assert b.tokenizer.decode(b.tokenizer(text)["input_ids"]) == text
  assert pipeline.Prompter(b.tokenizer).tokenizer is b.tokenizer


def test_dry_run_plans_each_group_of_the_paper_second_pool_on_8_devices():
  out = dry_run_stdout("hetero.py")
  assert "group0: hf:Qwen/Qwen2.5-7B-Instruct" in out
  assert "group1: hf:meta-llama/Llama-3.1-8B-Instruct" in out
  assert "group2: hf:deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in out
  assert "1 x llama (hidden 4096, 32 layers, vocab 128256)" in out
  assert out.count("1 x qwen2 (hidden 3584, 28 layers, vocab 152064)") == 2
  groups = [float(line.split("cpu:0: ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("bytes per device: ")]
  total = float(out.split("all 3 groups, bytes per device: cpu:0: ")[1].split()[0])
  assert len(groups) == 3 and total == pytest.approx(sum(groups), abs=0.02)
  # About 7.6 + 8.0 + 7.6 B bf16 params over 8 devices, plus LoRA and AdamW states.
  assert 5.3 < total < 6.5, total


def test_single_on_a_heterogeneous_pool_is_the_chosen_members_answers(groups, tmp_path):
  c = _config(strategy="single", strategy_config=config_dict.ConfigDict({"model": 1}), rounds=0)
  evolve.run(c, tmp_path, groups, progress=False)
  read = lambda part: [json.loads(x) for x in
                       (tmp_path / "round_0" / part / "records.jsonl").read_text().splitlines()]
  member = {r["id"]: r["output"].strip() for r in read("singles") if r["model"] == "tiny-qwen2:0"}
  collab_records = read("collaboration")
  assert len(collab_records) == 8
  assert all(r["output"] == member[r["id"]] for r in collab_records)


def test_a_round_with_no_correct_collaborative_answer_distils_no_group(groups, tmp_path,
                                                                       capsys):
  """As in the stacked loop: random members answer no dev row right, so the correctness filter
  keeps nothing; the round distils nothing (a warning, `distill.skipped` in its record) and every
  member answers the test rows in round 1 exactly as in round 0."""
  check_round_without_training_rows(_config(**{"distill.correctness_filter": True}), groups,
                                    tmp_path, lambda: capsys.readouterr().out, "output")
