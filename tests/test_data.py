"""Task builders on fixtures written in the real source formats; splits; the prompt pipeline."""

import dataclasses
import io
import json
import os
import socket
import tarfile
import time

import numpy as np
import pytest

from single_multi.data import bigbench, common, gsm8k, metrics, mmlu, pipeline, synthetic, tasks
from single_multi.models.tiny import ByteTokenizer as CharTokenizer

# -------------------------------------------------------------------------------------------------
# MMLU: the official archive layout (headerless CSV), its extracted tree, and the parquet copy.

MMLU_CSV = {
    "data/dev/anatomy_dev.csv": 'What is the largest organ?,Skin,Liver,Heart,Brain,A\n'
                                'Bones in the adult body?,206,201,212,300,A\n',
    "data/val/anatomy_val.csv": '"Which organ pumps blood, mainly?",Lung,Heart,Kidney,Skin,B\n',
    "data/test/anatomy_test.csv": 'Where is the femur?,Arm,Leg,Skull,Chest,B\n'
                                  'Bad letter row?,a,b,c,d,E\n'
                                  'Missing answer row?,a,b,c,d,\n'
                                  'Empty option row?,a,,c,d,C\n',
    "data/dev/virology_dev.csv": 'A virus is?,Alive,Not cellular,A plant,A fungus,B\n',
    "data/val/virology_val.csv": 'HIV targets?,CD4 cells,Red cells,Neurons,Bone,A\n',
    "data/test/virology_test.csv": 'Influenza is a?,Bacterium,Virus,Prion,Fungus,B\n',
}


@pytest.fixture
def offline(monkeypatch):
  """No host is reachable: every socket connection fails at once."""
  def unreachable(*a, **k):
    raise OSError("network is unreachable")
  monkeypatch.setattr(socket, "create_connection", unreachable)


def _write_tree(root, files):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
  return root


def _load_mmlu(tmp_path, manual, config="all"):
  builder = mmlu.Mmlu(data_dir=str(tmp_path / "tfds"), config=config)
  common.prepare(builder, str(manual))
  return tasks.Task("mmlu", tasks.TASKS["mmlu"], builder)


def _by_id(examples):
  return {e.id: e for e in examples}


def test_mmlu_csv_tree_fields_exact(tmp_path):
  task = _load_mmlu(tmp_path, _write_tree(tmp_path / "manual", MMLU_CSV))
  test = _by_id(task.examples("test"))
  assert test["anatomy/test/0"] == common.Example(
      "anatomy/test/0", "anatomy", "Where is the femur?", ("Arm", "Leg", "Skull", "Chest"), 1,
      ("Leg",), "")
  val = _by_id(task.examples("validation"))
  assert val["anatomy/validation/0"].question == "Which organ pumps blood, mainly?"
  assert val["virology/validation/0"].answer == 0
  assert len(task.examples("dev")) == 3
  # Bad rows are kept, marked, never silently dropped.
  assert test["anatomy/test/1"].problem == "answer index 4 out of range for 4 choices"
  assert test["anatomy/test/2"].problem == "no target"
  assert test["anatomy/test/3"].problem == "empty choice text"
  assert sorted(e.id for e in task.examples("test") if not e.problem) == [
      "anatomy/test/0", "virology/test/0"]


def test_mmlu_archive_equals_csv_tree(tmp_path):
  archive = tmp_path / "manual_tar" / "data.tar"
  archive.parent.mkdir()
  with tarfile.open(archive, "w") as tar:
    for name, text in MMLU_CSV.items():
      info = tarfile.TarInfo(name)
      info.size = len(text.encode())
      tar.addfile(info, io.BytesIO(text.encode()))
  from_tar = _load_mmlu(tmp_path / "a", archive.parent)
  from_csv = _load_mmlu(tmp_path / "b", _write_tree(tmp_path / "manual_csv", MMLU_CSV))
  for split in ("dev", "validation", "test"):
    assert _by_id(from_tar.examples(split)) == _by_id(from_csv.examples(split))


def test_mmlu_parquet_layout(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = {"anatomy": [("Where is the femur?", ["Arm", "Leg", "Skull", "Chest"], 1)],
          "virology": [("Influenza is a?", ["Bacterium", "Virus", "Prion", "Fungus"], 1),
                       ("Out of range?", ["a", "b", "c", "d"], 7)]}
  root = tmp_path / "parquet"
  def write(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"question": [q for _, q, _, _ in items],
                             "subject": [s for s, _, _, _ in items],
                             "choices": [c for _, _, c, _ in items],
                             "answer": [a for _, _, _, a in items]}), path)
  flat = [(s, *r) for s, rs in rows.items() for r in rs]
  for subject in rows:
    write(root / subject / "test-00000-of-00001.parquet", [r for r in flat if r[0] == subject])
  write(root / "all" / "test-00000-of-00001.parquet", flat)  # Same rows: must not double.
  task = _load_mmlu(tmp_path, root)
  test = _by_id(task.examples("test"))
  assert sorted(test) == ["anatomy/test/0", "virology/test/0", "virology/test/1"]
  assert test["virology/test/0"] == common.Example(
      "virology/test/0", "virology", "Influenza is a?", ("Bacterium", "Virus", "Prion", "Fungus"),
      1, ("Virus",), "")
  assert test["virology/test/1"].problem == "answer index 7 out of range for 4 choices"


def test_mmlu_non_utf8_file_is_reported(tmp_path):
  files = dict(MMLU_CSV)
  files["data/test/virology_test.csv"] = b"Caf\xe9 question?,a,b,c,d,A\n"
  task = _load_mmlu(tmp_path, _write_tree(tmp_path / "manual", files))
  bad = [e for e in task.examples("test") if e.id.startswith("file:")]
  assert len(bad) == 1 and "virology_test.csv" in bad[0].id and "not UTF-8" in bad[0].problem


def test_mmlu_redux_requires_its_subjects(tmp_path):
  with pytest.raises(common.DataError, match="subjects .* are not in"):
    _load_mmlu(tmp_path, _write_tree(tmp_path / "manual", MMLU_CSV), config="redux")


def test_mmlu_offline_without_manual_dir_fails_fast(tmp_path, offline):
  start = time.perf_counter()
  with pytest.raises(common.DataError, match="manual dir"):
    _load_mmlu(tmp_path, tmp_path / "missing")
  assert time.perf_counter() - start < 10


# -------------------------------------------------------------------------------------------------
# BIG-bench: task.json with target_scores / target, subtasks, prefixes, bad rows.

def _bigbench_tree(root):
  tasks_dir = root / "bigbench" / "benchmark_tasks"
  def task(name, spec):
    path = tasks_dir / name / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
  task("mc_task", {"name": "mc_task", "task_prefix": "Pick the fruit.", "examples": [
      {"input": f"Item set {i}", "target_scores": {"apple": 1, "rock": 0, "pear": 1 if i % 2 else 0}}
      for i in range(20)] + [{"input": "Item set 3", "target_scores": {"apple": 1, "rock": 0}},
                            {"input": "empty options", "target_scores": {}},
                            {"input": "nothing right", "target_scores": {"a": 0, "b": 0}}]})
  task("gen_task", {"name": "gen_task", "example_input_prefix": "\nList: ", "examples": [
      {"input": "b a", "target": "a b"}, {"input": "d c", "target": ["c d", "c, d"]},
      {"input": "no target here"}]})
  task("parent", {"name": "parent", "examples": []})
  task("parent/sub_a", {"name": "sub_a", "examples": [{"input": "x?", "target": "x"}]})
  task("parent/sub_b", {"name": "sub_b", "examples": [{"input": "y?", "target": "y"}]})
  (tasks_dir / "latin1").mkdir()
  (tasks_dir / "latin1" / "task.json").write_bytes(b'{"examples": [{"input": "caf\xe9"}]}')
  return root


def _load_bigbench(tmp_path, names, **cfg):
  config = bigbench.BigbenchConfig(name="fixture_" + "_".join(sorted(cfg)) + str(cfg.get("seed", 0)),
                                   tasks=tuple(names), **cfg)
  builder = bigbench.Bigbench(data_dir=str(tmp_path / "tfds"), config=config)
  common.prepare(builder, str(_bigbench_tree(tmp_path / "checkout")))
  return tasks.Task("bigbench", tasks.TaskSpec("bigbench", None, "dev", "test", "dev",
                                              "exact_match"), builder)


def test_bigbench_fields_subtasks_and_bad_rows(tmp_path):
  task = _load_bigbench(tmp_path, ["mc_task", "gen_task", "parent", "latin1"])
  stored = tasks.Task(task.name, task.spec, task.builder, shuffle=False)  # The file's order.
  stored_rows = _by_id(stored.dev + stored.test)
  assert stored_rows["mc_task/1"] == common.Example(
      "mc_task/1", "mc_task", "Pick the fruit.\nItem set 1", ("apple", "rock", "pear"), 0,
      ("apple", "pear"), "")
  rows = _by_id(task.dev + task.test)  # As shown: BIG-bench options are always reordered.
  shown = rows["mc_task/1"]
  assert sorted(shown.option_order) == [0, 1, 2]
  assert shown.choices == tuple(("apple", "rock", "pear")[i] for i in shown.option_order)
  assert shown.choices[shown.answer] == "apple" and shown.targets == ("apple", "pear")
  assert {shown.choices[i] for i in shown.correct} == {"apple", "pear"}
  assert rows["mc_task/0"].targets == ("apple",)
  assert rows["gen_task/0"] == common.Example("gen_task/0", "gen_task", "List: b a",
                                              targets=("a b",))
  assert rows["gen_task/1"].targets == ("c d", "c, d") and not rows["gen_task/1"].is_mc
  assert rows["parent/sub_a/0"].subject == "parent/sub_a"
  assert rows["parent/sub_b/0"].targets == ("y",)
  assert rows["mc_task/21"].problem == "empty choices"
  assert rows["mc_task/22"].problem == "no option has a positive score"
  assert rows["gen_task/2"].problem == "no target"
  assert "not UTF-8" in rows["file:latin1/task.json"].problem
  # A whole unreadable file is reported in both splits.
  assert "file:latin1/task.json" in _by_id(task.dev) and "file:latin1/task.json" in _by_id(task.test)


def test_bigbench_splits_are_seeded_and_disjoint(tmp_path):
  a = _load_bigbench(tmp_path / "a", ["mc_task"], seed=0)
  b = _load_bigbench(tmp_path / "b", ["mc_task"], seed=0)
  c = _load_bigbench(tmp_path / "c", ["mc_task"], seed=1)
  ids = lambda t: (sorted(e.id for e in t.dev), sorted(e.id for e in t.test))
  assert ids(a) == ids(b) and ids(a) != ids(c)
  assert a.dev and a.test
  # "Item set 3" appears twice in the file: both copies land in the same split.
  dev_ids = {e.id for e in a.dev}
  assert ("mc_task/3" in dev_ids) == ("mc_task/20" in dev_ids)
  a.check_disjoint()
  assert not common.overlapping_questions([e.question for e in a.dev], [e.question for e in a.test])


# -------------------------------------------------------------------------------------------------
# Option order: the seeded shuffle, the gold-position check, the loader's policy.


def test_shuffle_options_is_seeded_and_moves_the_gold():
  ex = common.Example("t/7", "t", "Which?", ("a", "b", "c", "d", "e"), 3, ("d",))
  once, again = common.shuffle_options(ex, 0), common.shuffle_options(ex, 0)
  assert once == again
  assert sorted(once.option_order) == [0, 1, 2, 3, 4]
  assert once.choices == tuple("abcde"[i] for i in once.option_order)
  assert once.choices[once.answer] == "d" and once.option_order[once.answer] == 3
  assert once.correct == frozenset({once.answer})
  # Another seed or another id gives another order (for these two, checked once by hand).
  assert common.shuffle_options(ex, 1).option_order != once.option_order
  assert common.shuffle_options(dataclasses.replace(ex, id="t/8"), 0).option_order != \
      once.option_order
  # Idempotent on an already reordered row; generative rows pass through.
  assert common.shuffle_options(once, 5) == once
  gen = common.Example("g/0", "g", "Say x", targets=("x",))
  assert common.shuffle_options(gen, 0) == gen
  # 1000 rows with the gold always last: no position keeps more than 30% after the shuffle.
  rows = [common.Example(f"t/{i}", "t", f"q{i}", tuple("abcde"), 4, ("e",)) for i in range(1000)]
  shown = [common.shuffle_options(r, 0) for r in rows]
  shares = np.bincount([r.answer for r in shown], minlength=5) / 1000
  assert shares.max() < 0.3 and all(r.choices[r.answer] == "e" for r in shown)


def _mc_rows(golds, n_options=4, subject="s"):
  return [common.Example(f"{subject}/{i}", subject, f"{subject} question {i}",
                         tuple(f"o{j}" for j in range(n_options)), g, (f"o{g}",))
          for i, g in enumerate(golds)]


def test_position_check_fires_on_a_skewed_task_and_stays_quiet_on_a_balanced_one():
  balanced = common.position_check(_mc_rows([i % 4 for i in range(40)]))
  assert balanced.counts == (10, 10, 10, 10) and balanced.expected == (10.0,) * 4
  assert balanced.skewed == ()
  # 30 of 40 gold at A: 0.75 > 2 x 0.25.
  skewed = common.position_check(_mc_rows([0] * 30 + [1, 2, 3] * 3 + [1]))
  assert ("*", 0, 0.75) in skewed.skewed and ("s", 0, 0.75) in skewed.skewed
  assert "A holds 75%" in skewed.describe()
  # Exactly twice the uniform share is not "more than twice": 20 of 40 at A with 4 options.
  assert common.position_check(_mc_rows([0] * 20 + [1, 2, 3] * 6 + [1, 2])).skewed == ()
  # Mixed option counts: expected[p] sums 1/n over rows that have position p (hand count:
  # 20 rows of 2 options and 20 of 4: A and B expect 20*1/2 + 20*1/4 = 15, C and D 5).
  mixed = _mc_rows([0, 1] * 10, 2, "two") + _mc_rows([3] * 11 + [0, 1, 2] * 3, 4, "four")
  check = common.position_check(mixed)
  assert check.expected == (15.0, 15.0, 5.0, 5.0) and check.counts == (13, 13, 3, 11)
  assert ("*", 3, 11 / 40) in check.skewed and ("four", 3, 11 / 20) in check.skewed
  assert not any(s == "two" for s, _, _ in check.skewed)
  # Too few rows to judge: a subject of 8 rows all at A inside a balanced task of 48.
  small = _mc_rows([0] * 8, 4, "small") + _mc_rows([i % 4 for i in range(40)], 4, "big")
  assert [s for s, _, _ in common.position_check(small).skewed] == []
  # A rare position (a 10th option in 2 of 40 rows, expected 0.2 times) is not judged.
  rare = _mc_rows([i % 4 for i in range(38)]) + _mc_rows([9, 9], 10, "s10")
  assert common.position_check(rare).skewed == ()
  # Bad rows and generative rows are not counted.
  rows = _mc_rows([0, 1]) + [common.Example("g/0", "g", "x", targets=("y",)),
                             common.Example("b/0", "b", "x", ("a",), 3, (), "bad")]
  assert common.position_check(rows).rows == 2


def test_loader_shuffles_authored_or_skewed_sources_and_keeps_balanced_ones(tmp_path, caplog):
  # BIG-bench: always shown in a seeded order, the same for the same seed in two loads.
  a = _load_bigbench(tmp_path / "a", ["mc_task"])
  b = _load_bigbench(tmp_path / "b", ["mc_task"])
  orders = lambda t: {e.id: e.option_order for e in t.dev + t.test if e.is_mc and not e.problem}
  assert a.shuffle and orders(a) == orders(b) and all(orders(a).values())
  reseeded = tasks.Task(a.name, a.spec, a.builder, seed=3)
  assert orders(reseeded).keys() == orders(a).keys() and orders(reseeded) != orders(a)
  # In the file the gold ("apple") is always option A; as shown it is not.
  assert max(a.positions().shares) < 0.5
  # MMLU with near-uniform gold letters keeps the published order.
  balanced = {"data/test/anatomy_test.csv": "".join(
      f"Balanced question {i}?,w,x,y,z,{'ABCD'[i % 4]}\n" for i in range(24))}
  task = _load_mmlu(tmp_path / "m1", _write_tree(tmp_path / "m1src", balanced))
  assert task.shuffle is False and len(task.test) == 24
  assert all(e.answer == int(e.id.split("/")[-1]) % 4 for e in task.test)
  assert all(not e.option_order for e in task.test)
  # MMLU whose gold letters are skewed (all A): reordered, with a warning that says why.
  skewed = {"data/test/anatomy_test.csv": "".join(
      f"Skewed question {i}?,w,x,y,z,A\n" for i in range(24))}
  task = _load_mmlu(tmp_path / "m2", _write_tree(tmp_path / "m2src", skewed))
  with caplog.at_level("WARNING"):
    shown = task.test
  assert task.shuffle and all(e.option_order for e in shown)
  assert all(e.choices[e.answer] == "w" for e in shown)
  assert max(task.positions().shares) <= 0.5
  assert "reordered" in caplog.text and "A holds 100%" in caplog.text


def test_check_disjoint_catches_overlap():
  with pytest.raises(common.DataError, match="1 question text"):
    common.check_disjoint(["What is  2+2?"], ["what is 2+2?", "other"], "toy")


def test_bigbench_unknown_task_is_clear(tmp_path):
  with pytest.raises(common.DataError, match="no_such_task"):
    _load_bigbench(tmp_path, ["no_such_task"])


def test_bigbench_max_examples_is_a_seeded_subsample(tmp_path):
  a = _load_bigbench(tmp_path / "a", ["mc_task"], max_examples_per_task=10)
  b = _load_bigbench(tmp_path / "b", ["mc_task"], max_examples_per_task=10)
  assert len(a.dev + a.test) == 10
  assert sorted(e.id for e in a.dev + a.test) == sorted(e.id for e in b.dev + b.test)


def test_bigbench_local_checkout_rows_are_keyed_by_their_files(tmp_path, monkeypatch):
  """$SINGLE_MULTI_BIGBENCH (a checkout) stands in for the sdist; the manual dir wins over it;
  prepared rows are stored under the digest of the files read, so an edited file is re-read and
  the sdist's config names are never taken by a checkout's rows."""
  a = _bigbench_tree(tmp_path / "a")
  b = _bigbench_tree(tmp_path / "b")
  spec = json.loads((b / "bigbench/benchmark_tasks/gen_task/task.json").read_text())
  spec["examples"][0]["target"] = "edited"
  (b / "bigbench/benchmark_tasks/gen_task/task.json").write_text(json.dumps(spec))
  data = str(tmp_path / "tfds")
  sdist_name = tasks._bigbench_config(("gen_task",), None).name

  def targets(**kw):
    task = tasks.load_task("bigbench:gen_task", data_dir=data, **kw)
    assert task.builder.builder_config.name != sdist_name
    return {e.id: e.targets for e in task.dev + task.test}

  monkeypatch.setenv("SINGLE_MULTI_BIGBENCH", str(a))
  from_a = targets()
  monkeypatch.setenv("SINGLE_MULTI_BIGBENCH", str(b))
  from_b = targets()
  assert from_b["gen_task/0"] == ("edited",) and from_a["gen_task/0"] != ("edited",)
  assert {k: v for k, v in from_a.items() if k != "gen_task/0"} == {
      k: v for k, v in from_b.items() if k != "gen_task/0"}
  assert targets(manual_dir=str(a)) == from_a  # The manual dir wins over the variable.
  monkeypatch.setenv("SINGLE_MULTI_BIGBENCH", str(tmp_path / "missing"))
  with pytest.raises(common.DataError, match="SINGLE_MULTI_BIGBENCH"):
    tasks.load_task("bigbench:gen_task", data_dir=data)


def test_bigbench_sdist_missing_from_the_index_says_what_to_do(tmp_path, monkeypatch):
  """An index whose page lists no bigbench 1.0.0 (as PyPI did here on 2026-12-06): a fast error
  that names the ways to supply the files, not a traceback from deep inside TFDS."""
  import http.server
  import threading

  from single_multi import assets

  class Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
      body = b'<a href="bigbench-0.0.1.tar.gz#sha256=00">bigbench-0.0.1.tar.gz</a>'
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.HTTPServer(("127.0.0.1", 0), Index)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    monkeypatch.setenv("SINGLE_MULTI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SINGLE_MULTI_BIGBENCH", raising=False)
    start = time.time()
    with pytest.raises(common.DataError) as e:
      tasks.load_task("bigbench:gen_task", data_dir=str(tmp_path / "tfds"))
    assert time.time() - start < 30
    assert "lists no bigbench-1.0.0.tar.gz" in str(e.value)
    assert "SINGLE_MULTI_BIGBENCH" in str(e.value) and "data_manual_dir" in str(e.value)
    assert not (tmp_path / "cache" / "packages" / assets.BIGBENCH_SDIST).exists()
  finally:
    server.shutdown()


# -------------------------------------------------------------------------------------------------
# GSM8K: from its official JSONL files in a manual dir; bad lines; offline error.

def test_gsm8k_from_manual_jsonl(tmp_path):
  manual = tmp_path / "gsm"
  manual.mkdir()
  rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
          {"question": "A shirt costs $1,200 less $200?", "answer": "So 1,000.\n#### 1,000"}]
  for name in ("train", "test"):
    (manual / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  builder = gsm8k.Gsm8k(data_dir=str(tmp_path / "tfds"))
  common.prepare(builder, str(manual))
  task = tasks.Task("gsm8k", tasks.TASKS["gsm8k"], builder)
  got = [(e.id, e.question, e.targets) for e in task.test]  # In the file's line order.
  assert got == [("gsm8k/test/0", "Tom has 3 apples and buys 4. How many?", ("7",)),
                 ("gsm8k/test/1", "A shirt costs $1,200 less $200?", ("1,000",))]
  # The full worked answer survives storage (the Co-LLM reference trains on it).
  assert [e.solution for e in task.dev] == ["3+4=<<3+4=7>>7\n#### 7", "So 1,000.\n#### 1,000"]


def test_gsm8k_malformed_lines_are_counted_and_named_by_file_and_line(tmp_path):
  manual = tmp_path / "gsm"
  manual.mkdir()
  good = json.dumps({"question": "1 + 1?", "answer": "1+1=2\n#### 2"}).encode()
  lines = [good, b"\xff\xfe not utf-8", b"   ", b"{not json", json.dumps({"question": "q"}).encode(),
           json.dumps({"question": "q", "answer": "no marker"}).encode(), good]
  (manual / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  (manual / "test.jsonl").write_bytes(good + b"\n")
  builder = gsm8k.Gsm8k(data_dir=str(tmp_path / "tfds"))
  common.prepare(builder, str(manual))
  task = tasks.Task("gsm8k", tasks.TASKS["gsm8k"], builder)
  rows = task.examples("train")
  assert [e.id for e in rows] == [f"gsm8k/train/{i}" for i in range(7)]
  problems = [e.problem for e in rows]
  assert problems[0] == problems[6] == ""
  assert problems[1].startswith("train.jsonl line 2: not UTF-8")
  assert problems[2] == "train.jsonl line 3: blank line"
  assert problems[3].startswith("train.jsonl line 4: not JSON")
  assert problems[4] == "train.jsonl line 5: no 'answer'"
  assert problems[5] == "train.jsonl line 6: no '####' final answer in 'answer'"
  assert [e.id for e in task.dev if not e.problem] == ["gsm8k/train/0", "gsm8k/train/6"]


def test_gsm8k_offline_fails_fast_with_the_fix(tmp_path, offline):
  start = time.perf_counter()
  with pytest.raises(common.DataError, match="GSM8K .* unreachable.*manual dir"):
    tasks.load_task("gsm8k", data_dir=str(tmp_path / "tfds"))
  assert time.perf_counter() - start < 10


def test_unknown_task_name():
  with pytest.raises(common.DataError, match="unknown task 'mmlu_pro'"):
    tasks.load_task("mmlu_pro")


# -------------------------------------------------------------------------------------------------
# Prompts and batches.


def _examples(n, subject="s", prefix="q"):
  return [common.Example(f"{subject}/{i}", subject, f"{prefix} {i} " + "x" * i, ("yes", "no"),
                         i % 2, (("yes", "no")[i % 2],)) for i in range(n)]


def test_shots_come_from_the_shot_split_same_subject_and_are_fixed():
  shots = _examples(6, "a", "shot") + _examples(6, "b", "shot")
  prompter = pipeline.Prompter(CharTokenizer(), pipeline.PromptConfig(k_shot=3), shots)
  ex = _examples(3, "b", "query")[2]
  picked = prompter.exemplars(ex)
  assert len(picked) == 3 and all(s.subject == "b" and s in shots for s in picked)
  assert picked == prompter.exemplars(ex)  # Deterministic.
  text = prompter.text(ex)
  assert text.count("<user>") == 4 and text.endswith("<assistant>")
  assert "The answer is (" in text and "A. yes\nB. no" in text
  # An exemplar never repeats the question; too few same-subject shots fall back to any subject.
  twin = common.Example("c/0", "c", shots[0].question, ("yes", "no"), 0, ("yes",))
  assert all(s.question != twin.question for s in prompter.exemplars(twin))


def test_generation_batches_bucket_shard_and_skip_bad_rows():
  exs = _examples(21)
  exs[4] = common.Example("s/4", "s", "bad", ("a", "b"), 9, (), "answer index 9 out of range")
  prompter = pipeline.Prompter(CharTokenizer())
  full = list(pipeline.generation_batches(exs, prompter, batch_size=4))
  seen = [i for b in full for i in b["index"] if i >= 0]
  assert sorted(seen) == [i for i in range(21) if i != 4]
  for b in full:
    T = b["tokens"].shape[1]
    assert b["tokens"].shape == (4, T) and T & (T - 1) == 0  # Power-of-two bucket.
    for row, i in enumerate(b["index"]):
      if i >= 0:
        ids = prompter.ids(exs[i])
        assert b["tokens"][row, -len(ids):].tolist() == ids and b["mask"][row].sum() == len(ids)
      else:
        assert b["mask"][row].sum() == 0
  shards = [list(pipeline.generation_batches(exs, prompter, batch_size=4, shard=(k, 2)))
            for k in range(2)]
  assert len(shards[0]) == len(shards[1])
  per_shard = [{int(i) for b in s for i in b["index"] if i >= 0} for s in shards]
  assert not per_shard[0] & per_shard[1] and per_shard[0] | per_shard[1] == set(seen)


def test_shared_prefix_by_hand():
  assert pipeline.shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
  # Each prompt keeps at least its last token: identical prompts share all but one.
  assert pipeline.shared_prefix([[7, 8, 9], [7, 8, 9]]) == [7, 8]
  assert pipeline.shared_prefix([[1, 2], [3, 2]]) == [] and pipeline.shared_prefix([]) == []


def test_generation_batches_split_prefix_rebuilds_every_prompt():
  exs = _examples(9)
  exs[2] = common.Example("s/2", "s", "bad", ("a", "b"), 9, (), "answer index 9 out of range")
  prompter = pipeline.Prompter(CharTokenizer())
  valid = [prompter.ids(e) for e in exs if not e.problem]
  head = pipeline.shared_prefix(valid)
  assert head and head == os.path.commonprefix(valid)  # The template's fixed head.
  for b in pipeline.generation_batches(exs, prompter, batch_size=4, split_prefix=True):
    assert b["prefix"].tolist() == head
    for row, i in enumerate(b["index"]):
      rest = b["rest"][row][b["rest_mask"][row] == 1].tolist()
      if i >= 0:
        assert head + rest == prompter.ids(exs[i])
        assert b["rest"][row, -len(rest):].tolist() == rest  # Left-padded.
      else:
        assert not rest
  # A single prompt: all but its last token is the head.
  one = [common.Example("a/0", "a", "x", ("yes", "no"), 0, ("yes",))]
  b = next(iter(pipeline.generation_batches(one, prompter, batch_size=2, split_prefix=True)))
  assert len(b["prefix"]) == len(prompter.ids(one[0])) - 1 and b["rest_mask"][0].sum() == 1


def test_loglik_batches_layout():
  exs = _examples(5)
  prompter = pipeline.Prompter(CharTokenizer())
  b = next(iter(pipeline.loglik_batches(exs, prompter, batch_size=8)))
  row = list(b["index"]).index(3)
  assert b["choices"].shape[0] == 12  # 5 examples x 2 options, bucketed (8, 12, 16, ...).
  assert b["slot"].tolist() == [0, 1] * 5 + [-1, -1]
  mine = np.flatnonzero(b["owner"] == row)[:2]
  assert b["choices"][mine[1], :2].tolist() == [2 + ord("n"), 2 + ord("o")]
  assert b["choice_mask"][mine].sum(axis=1).tolist() == [3, 2]
  assert b["choice_mask"][10:].sum() == 0
  assert "A. yes" not in prompter.text(exs[3], with_options=False)


def test_iterator_checkpoint_resumes_exactly():
  prompter = pipeline.Prompter(CharTokenizer())
  batches = pipeline.generation_batches(_examples(40), prompter, batch_size=4)
  it = pipeline.prefetch(batches)
  for _ in range(3):
    next(it)
  state = it.get_state()
  rest = [next(it)["index"].tolist() for _ in range(4)]
  resumed = pipeline.prefetch(batches)
  resumed.set_state(json.loads(json.dumps(state)) if isinstance(state, dict) else state)
  assert [next(resumed)["index"].tolist() for _ in range(4)] == rest


def test_config_manual_dir_reaches_the_builders(monkeypatch):
  """`--config.data_manual_dir` (the field the offline errors name) is the builders' manual dir."""
  from ml_collections import config_dict
  seen = {}
  monkeypatch.setattr(tasks, "load_task", lambda name, **kw: seen.update(kw, name=name))
  c = config_dict.ConfigDict({"seed": 3, "moco_data_dir": "", "data_manual_dir": "/data/mmlu"})
  tasks.from_config("mmlu", c)
  assert seen == {"name": "mmlu", "seed": 3, "moco_dir": None, "manual_dir": "/data/mmlu"}


def test_balanced_rows_split_evenly_stable_and_seeded():
  rows = ([common.Example(f"a/{i}", "a", f"qa {i}", targets=("x",)) for i in range(10)]
          + [common.Example(f"b/{i}", "b", f"qb {i}", targets=("x",)) for i in range(3)]
          + [common.Example(f"c/{i}", "c", f"qc {i}", targets=("x",)) for i in range(10)]
          + [common.Example("c/bad", "c", "", problem="empty question")])
  picked = common.balanced(rows, 12, seed=0)
  assert common.composition(picked) == {"a": 5, "b": 3, "c": 4}  # b runs out: its share moves.
  assert common.composition(common.balanced(rows, 9, seed=0)) == {"a": 3, "b": 3, "c": 3}
  assert common.balanced(list(reversed(rows)), 12, seed=0) == picked  # Not file order.
  assert common.balanced(rows, 12, seed=1) != picked
  assert len(common.balanced(rows, 100, seed=0)) == 23  # Every valid row, the bad one never.


# -------------------------------------------------------------------------------------------------
# Generated families (data/synthetic.py).


def test_spell_hand_computed_numbers():
  cases = {0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 42: "forty two",
           100: "one hundred", 101: "one hundred one", 342: "three hundred forty two",
           1000: "one thousand", 7005: "seven thousand five", 7500: "seven thousand five hundred",
           9999: "nine thousand nine hundred ninety nine"}
  assert {n: synthetic.spell(n) for n in cases} == cases
  with pytest.raises(ValueError):
    synthetic.spell(10000)


def test_synthetic_rows_are_fixed_unique_and_right():
  words_to_int = {w: i for i, w in enumerate(synthetic._ONES)}
  words_to_int.update({w: 10 * i for i, w in enumerate(synthetic._TENS) if w})

  def parse(text):  # An independent reading of the spelled number.
    total, part = 0, 0
    for w in text.split():
      if w == "thousand":
        total, part = total + part * 1000, 0
      elif w == "hundred":
        part *= 100
      else:
        part += words_to_int[w]
    return total + part

  assert set(synthetic.INSTRUCTIONS) == set(synthetic.FAMILIES)  # Every family says its task.
  for family in synthetic.FAMILIES:
    rows = synthetic.family_rows(family, rows=300)
    assert rows == synthetic.family_rows(family, rows=300), family  # Fixed, not run-seeded.
    assert len({r["input"] for r in rows}) == len(rows) > 200, family
    for r in rows:
      text, target = r["input"], r["target"]
      assert target == target.strip() and target, (family, r)
      assert metrics.normalize_answer(target) == target.lower(), r  # Exact match keeps it.
      if family == "number_words":
        assert parse(target) == int(text), r
      elif family == "reverse_words":
        assert target.split()[::-1] == text.split() and 3 <= len(text.split()) <= 5, r
      elif family == "key_value":
        pairs, asked = text.split(" ; ")
        assert dict(p.split("=") for p in pairs.split())[asked] == target, r
      elif family == "acronym":
        assert target == "".join(w[0] for w in text.split()) and target.isupper(), r
      elif family == "sort_numbers":
        assert [int(x) for x in target.split()] == sorted(int(x) for x in text.split()), r
  with pytest.raises(common.DataError, match="unknown synthetic family"):
    synthetic.family_rows("nope")


def test_synthetic_task_loads_with_disjoint_seeded_splits(tmp_path, monkeypatch, capsys, caplog):
  monkeypatch.setenv("SINGLE_MULTI_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr("single_multi.data.synthetic.ROWS", 200)
  name = "synthetic:reverse_words,key_value"
  with caplog.at_level("INFO"):
    task = tasks.load_task(name, data_dir=str(tmp_path / "tfds"))
  # TFDS's own "Downloading and preparing ..." prints go to the log, not the console.
  assert "preparing" not in capsys.readouterr().out
  assert any("tfds: Downloading and preparing" in r.getMessage() for r in caplog.records)
  dev, test = common.composition(task.dev), common.composition(task.test)
  assert set(dev) == set(test) == {"reverse_words", "key_value"}
  assert all(60 <= n <= 140 for n in list(dev.values()) + list(test.values())), (dev, test)
  assert task.spec.metric == "exact_match" and not any(e.is_mc for e in task.dev)
  task.check_disjoint()
  by_input = {r["input"]: r["target"] for r in synthetic.family_rows("key_value")}
  row = next(e for e in task.test if e.subject == "key_value")
  instruction, text = row.question.split("\n")  # The family's instruction, then the input.
  assert instruction == synthetic.INSTRUCTIONS["key_value"]
  assert row.targets == (by_input[text],)
  again = tasks.load_task(name, data_dir=str(tmp_path / "tfds"))  # Prepared once, read back.
  assert [e.question for e in again.test] == [e.question for e in task.test]
  other = tasks.load_task(name, data_dir=str(tmp_path / "tfds"), seed=1)
  assert {e.question for e in other.test} != {e.question for e in task.test}
  with pytest.raises(common.DataError, match="synthetic family"):
    tasks.parse_name("synthetic:reverse_words,nope")
  # An edited generator (here: more draws) rewrites the cached file and gives other rows.
  monkeypatch.setattr("single_multi.data.synthetic.ROWS", 300)
  edited = tasks.load_task(name, data_dir=str(tmp_path / "tfds"))
  assert len(edited.dev) + len(edited.test) > len(task.dev) + len(task.test)
  assert edited.builder.builder_config.name != task.builder.builder_config.name
