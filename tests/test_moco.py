"""The paper's task files (data/moco.py): the reference's prompts and scoring rules on hand-computed
cases (model_collaboration/data/eval.py at moco.COMMIT), the builder on rows written here, the
source's offline and checksum errors."""

import hashlib
import json
import socket
import time

import pytest

from single_multi import evaluate
from single_multi.data import common, metrics, moco, pipeline, tasks
from single_multi.models.tiny import ByteTokenizer

# -------------------------------------------------------------------------------------------------
# Multiple choice: the three-pass parse.

OPTIONS = ["Paris", "London", "Rome", "Berlin"]


@pytest.mark.parametrize("reply, want", [
    # Pass 1: the reply is the letter, or starts with "b)", "b." or "b ".
    ("B", 1), (" c ", 2), ("d) Berlin", 3), ("a. because", 0), ("B is my pick", 1),
    # Pass 2: an option's text anywhere (the first option in order wins).
    ("I would say rome.", 2), ("Berlin, not London", 1),
    # Pass 3: "b)", "(b)", "answer is b" or "b." anywhere, letters tried in order.
    ("I think (C) is right", 2), ("So the answer is d", 3), ("Option c.", 2),
    # Quirk kept from the reference: "a." inside a word ("data.") picks A before "(B)".
    ("From the data. I pick (B)", 0),
    # No pick.
    ("None of these", None), ("", None),
])
def test_moco_choice_three_passes(reply, want):
  assert metrics.moco_choice(reply, OPTIONS) == want


def test_moco_choice_letters_stop_at_the_number_of_options():
  assert metrics.moco_choice("E", ["x", "y"]) is None
  assert metrics.moco_choice("(b)", ["x", "y"]) == 1


# -------------------------------------------------------------------------------------------------
# Free-form answers: box, then phrases, then the whole reply.


@pytest.mark.parametrize("reply, want", [
    ("so \\box{42}.", "42"),
    ("first \\boxed{1} then \\box{ 7 }", "7"),  # The last box, stripped.
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # Balanced braces (the one deviation).
    ("\\BOX{x}", "x"),  # Case-insensitive.
    ("\\box 12 apples\nmore", "12 apples"),  # No brace: the rest of the line.
    ("Work...\nFinal Answer: Madrid\nDone", "Madrid"),
    ("The answer is: 5 cats.\n", "5 cats"),
    ("I believe the answer is Paris. ", "Paris"),  # Trailing ". " stripped.
    ("Answer = blue\nbecause", "blue"),
    ("  just text  ", "just text"),
])
def test_moco_answer_extraction(reply, want):
  assert metrics.moco_answer(reply) == want


def test_alias_lists_parse_whole_aliases():
  assert metrics.alias_list('["association football", "football", "soccer"]') == [
      "association football", "football", "soccer"]
  # An alias with a comma stays whole (the reference would split it in two).
  assert metrics.alias_list('["Washington, D.C.", "DC"]') == ["Washington, D.C.", "DC"]
  assert metrics.alias_list("['O\\'Neil', 'Eugene']") == ["O'Neil", "Eugene"]  # Python list.
  assert metrics.alias_list('[Nagarjuna, "Akkineni Nagarjuna"]') == [  # Neither: the
      "Nagarjuna", "Akkineni Nagarjuna"]                                # reference's split.
  assert metrics.alias_list('"solo"') == ["solo"]


def test_moco_scores_by_task_type():
  mc = common.Example("arc_challenge/test/0", "arc_challenge", "Capital?", tuple(OPTIONS), 1,
                      ("London",))
  assert evaluate._score_moco(mc, "B) London")["score"] == 1.0
  assert evaluate._score_moco(mc, "Rome")["score"] == 0.0
  # Metric "moco" scores MC rows by the reference's parse, not the default extraction (they
  # disagree here: the reference's "a." quirk picks A; the default parse reads "(B)").
  quirk = "From the data. I pick (B)"
  assert evaluate.score_generated(mc, quirk, "moco")["prediction"] == "A"
  assert evaluate.score_generated(mc, quirk, "exact_match")["prediction"] == "B"
  em = common.Example("gsm8k/test/0", "gsm8k", "2+2?", targets=("4",))
  out = evaluate._score_moco(em, "It is \\box{4}.")
  assert out["score"] == 1.0 and out["prediction"] == "4"
  assert evaluate._score_moco(em, "\\box{4 apples}")["score"] == 0.0  # Exact after normalising.
  # popqa: F1 maximised over aliases. "the soccer game" -> tokens [soccer, game] (article gone):
  # against "soccer": P 1/2, R 1 -> 2/3; against "association football": 0.
  pop = common.Example("popqa/test/0", "popqa", "Sport?",
                       targets=("association football", "soccer"))
  out = evaluate._score_moco(pop, "\\box{the soccer game}")
  assert out["score"] == pytest.approx(2 / 3) and out["exact"] == 0.0


# -------------------------------------------------------------------------------------------------
# Prompts: the reference's user turns, character for character.


def test_moco_prompts_are_the_references_text():
  cfg = pipeline.PromptConfig(style="moco")
  mc = common.Example("x/0", "arc_challenge", "Which is red? ", ("sky", "blood"), 1, ("blood",))
  assert pipeline.question_text(mc, cfg) == (
      "Which is red? \nA) sky\nB) blood\nPlease select the correct answer by choosing the letter "
      "corresponding to your choice.\n")
  gen = common.Example("x/1", "gsm8k", "How many?\n\n", targets=("3",))
  assert pipeline.question_text(gen, cfg) == (
      "How many?\n\nPlease provide the final, direct answer wrapped exactly as \\box{ANSWER}")
  with pytest.raises(ValueError, match="prompt style"):
    pipeline.question_text(gen, pipeline.PromptConfig(style="nope"))


# -------------------------------------------------------------------------------------------------
# The builder and the source.

FILES = {
    "arc_challenge": {"name": "arc_challenge", "task_type": "multiple_choice",
                      "dev": [{"id": "a", "question": "Dev q?", "choices": {"A": "x", "B": "y"},
                               "answer": "B"}],
                      "test": [{"id": "b", "question": "Which?",
                                "choices": {"A": "p", "B": "q", "C": "r"}, "answer": "C"},
                               {"id": "c", "question": "Numbered?",
                                "choices": {"1": "one", "2": "two"}, "answer": "2"},
                               {"id": "d", "question": "Broken?", "choices": {"A": "s"},
                                "answer": "Z"}]},
    "popqa": {"name": "popqa", "task_type": "f1_match",
              "dev": [{"id": 1, "input": "Who?", "output": '["Ann", "Ann B"]'},
                      {"id": 1, "input": "Same id?", "output": '["x"]'}],
              "test": [{"id": 2, "input": "Where?", "output": '["Washington, D.C."]'}]},
}


@pytest.fixture
def moco_dir(tmp_path):
  root = tmp_path / "moco_data"
  root.mkdir()
  for name, data in FILES.items():
    (root / f"{name}.json").write_text(json.dumps(data))
  return root


def test_builder_keeps_published_splits_and_maps_keys_by_position(moco_dir, tmp_path, caplog):
  with caplog.at_level("WARNING"):
    task = tasks.load_task("moco:arc_challenge,popqa", moco_dir=str(moco_dir),
                           data_dir=str(tmp_path / "tfds"))
  rows = {e.id: e for e in task.dev + task.test}
  assert sorted(e.id for e in task.dev) == ["arc_challenge/dev/0", "popqa/dev/0", "popqa/dev/1"]
  assert rows["arc_challenge/test/0"] == common.Example(
      "arc_challenge/test/0", "arc_challenge", "Which?", ("p", "q", "r"), 2, ("r",))
  assert rows["arc_challenge/test/1"].answer == 1 and not rows["arc_challenge/test/1"].problem
  assert "is not an option key" in rows["arc_challenge/test/2"].problem
  assert rows["popqa/test/0"].targets == ("Washington, D.C.",)
  assert rows["popqa/dev/0"].targets == ("Ann", "Ann B") and not rows["popqa/dev/0"].is_mc
  assert task.spec.metric == "moco" and task.spec.prompt == "moco" and task.shuffle is False
  # Reported: the numbered keys, the files that differ from the published ones.
  assert "option keys other than A, B, C" in caplog.text
  assert "differs from the published file" in caplog.text


def test_reward_model_tasks_are_refused_before_any_decode(tmp_path):
  ex = common.Example("human_interest/test/0", "human_interest", "Why?", targets=("ref",))
  with pytest.raises(common.DataError, match="reward model"):
    evaluate.evaluate(None, [ex], prompter=pipeline.Prompter(ByteTokenizer(), pipeline.PromptConfig(
        chat_template=False)), metric="moco")


def test_unknown_moco_task_and_missing_files_are_clear(moco_dir, tmp_path):
  with pytest.raises(common.DataError, match="unknown MoCo task 'arc'"):
    tasks.load_task("moco:arc", moco_dir=str(moco_dir), data_dir=str(tmp_path))
  with pytest.raises(common.DataError, match=r"lacks \['gsm8k.json'\]"):
    tasks.load_task("moco:gsm8k", moco_dir=str(moco_dir), data_dir=str(tmp_path))
  assert moco.file_names(["tablemwp", "bbh"]) == (
      "tablemwp_free_text", "tablemwp_multiple_choice", "bbh")
  assert len(moco.PAPER_TASKS) == 15


def test_offline_without_a_copy_fails_fast_naming_both_options(tmp_path, monkeypatch):
  monkeypatch.setenv("SINGLE_MULTI_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv(moco.ENV, raising=False)

  def unreachable(*a, **k):
    raise OSError("network is unreachable")
  monkeypatch.setattr(socket, "create_connection", unreachable)
  start = time.perf_counter()
  with pytest.raises(common.DataError) as err:
    tasks.load_task("moco:bbh", data_dir=str(tmp_path / "tfds"))
  assert time.perf_counter() - start < 10
  assert "moco_data_dir" in str(err.value) and moco.ENV in str(err.value)


def test_download_is_checked_against_the_pinned_sha256(tmp_path, monkeypatch):
  monkeypatch.setenv("SINGLE_MULTI_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv(moco.ENV, raising=False)
  monkeypatch.setattr(common, "require_online", lambda *a, **k: None)
  served = {}

  class Reply:
    def __init__(self, data):
      self.data = data

    def read(self):
      return self.data

  def urlopen(url, timeout=None):
    served["url"] = url
    return Reply(b'{"tampered": true}')
  monkeypatch.setattr("urllib.request.urlopen", urlopen)
  with pytest.raises(common.DataError, match="is not the pinned"):
    moco.source_dir(["bbh"])
  assert moco.COMMIT in served["url"] and served["url"].endswith("/bbh.json")
  assert not (tmp_path / "cache" / "moco_data" / "bbh.json").exists()
  # The right bytes are cached once and read from the cache afterwards.
  good = json.dumps(FILES["popqa"]).encode()
  monkeypatch.setitem(moco.FILES, "popqa", ("f1_match", hashlib.sha256(good).hexdigest()))
  monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: Reply(good))
  root = moco.source_dir(["popqa"])
  assert (root / "popqa.json").read_bytes() == good
  monkeypatch.setattr("urllib.request.urlopen", None)  # No second download.
  assert moco.source_dir(["popqa"]) == root
