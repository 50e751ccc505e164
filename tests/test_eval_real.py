"""The real thing: SmolLM2-135M-Instruct on real BIG-bench tasks from the bigbench 1.0.0 sdist, end
to end (builder -> prompts -> generation and log-likelihood scoring), with the option log-probs
checked against transformers on the same GGUF. The data checks skip, with the reason, without the
real files (the sdist or a checkout); the model checks then run on the rows tests/conftest.py
writes, and skip only without the model."""

import numpy as np
import pytest
from conftest import REAL_BIGBENCH, torch, transformers

import single_multi as sm
from single_multi import assets, evaluate
from single_multi.data import bigbench, common, pipeline, tasks

pytestmark = pytest.mark.slow
# Tasks whose files list the gold option at a fixed position (last; first for date_understanding).
AUTHORED = ("arithmetic/3_digit_addition", "arithmetic/2_digit_multiplication",
            "date_understanding")


@pytest.fixture(autouse=True, scope="module")
def _real_bigbench():
  """The real files: the sdist, or the checkout $SINGLE_MULTI_BIGBENCH named before the tests
  replaced it with their own rows (conftest.py)."""
  with pytest.MonkeyPatch.context() as mp:
    if REAL_BIGBENCH is None:
      mp.delenv("SINGLE_MULTI_BIGBENCH", raising=False)
    else:
      mp.setenv("SINGLE_MULTI_BIGBENCH", REAL_BIGBENCH)
    yield


def _real_task(data_dir):
  """general_knowledge + object_counting from the real files (raises when they cannot be had)."""
  if bigbench.local_root(None) is None:
    assets.bigbench_tasks_dir(("general_knowledge", "object_counting") + AUTHORED)  # One pass.
  return tasks.load_task("bigbench:general_knowledge,object_counting", data_dir=data_dir)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  try:
    return _real_task(str(tmp_path_factory.mktemp("tfds")))
  except (common.DataError, assets.AssetError) as e:
    pytest.skip(f"BIG-bench files unavailable: {e}")


@pytest.fixture(scope="module")
def rows(tmp_path_factory, _bigbench_rows):
  """(multiple-choice rows, generative rows, shot rows) for the model checks below: the real
  task's (general_knowledge, object_counting) when its files can be had, else the rows
  tests/conftest.py writes (general_knowledge, plural): those checks are about the model and the
  scoring, which any rows exercise."""
  data_dir = str(tmp_path_factory.mktemp("tfds_rows"))
  try:
    task, gen = _real_task(data_dir), "object_counting"
  except (common.DataError, assets.AssetError):
    gen = "linguistic_mappings/plural_json"
    task = tasks.load_task(f"bigbench:general_knowledge,{gen}", data_dir=data_dir,
                           manual_dir=str(_bigbench_rows))
  mc = [e for e in task.test if e.subject == "general_knowledge"]
  return mc, [e for e in task.test if e.subject == gen], task.examples(task.spec.shot_split)


@pytest.fixture(scope="module")
def model():
  try:
    path = assets.embedded_model_path("smollm2-135m-instruct")
  except assets.AssetError as e:
    pytest.skip(f"embedded model unavailable: {e}")
  return sm.load("embedded:smollm2-135m-instruct"), path


def test_real_bigbench_splits(task):
  task.check_disjoint()
  subjects = {e.subject for e in task.dev + task.test}
  assert subjects == {"general_knowledge", "object_counting"}
  gk = [e for e in task.dev + task.test if e.subject == "general_knowledge"]
  assert len(gk) == 70 and all(e.is_mc and e.choices[e.answer] in e.targets for e in gk)
  oc = [e for e in task.test if e.subject == "object_counting"]
  assert oc and all(not e.is_mc and e.targets for e in oc)


def test_real_authored_option_orders_are_shown_shuffled(task, tmp_path):
  for name in AUTHORED:
    shown = tasks.load_task(f"bigbench:{name}", data_dir=str(tmp_path))
    stored = tasks.Task(shown.name, shown.spec, shown.builder, shuffle=False)
    before, after = stored.positions(), shown.positions()
    assert before.rows == after.rows >= 300
    assert max(before.shares) > 0.9 and before.skewed, name  # As the files list them.
    assert max(after.shares) < 0.3 and not after.skewed, name  # As the models see them.
    # The same seed gives the same order in another load.
    again = tasks.load_task(f"bigbench:{name}", data_dir=str(tmp_path))
    assert [e.option_order for e in again.test] == [e.option_order for e in shown.test]


def test_loglik_scoring_matches_transformers(rows, model):
  ours, path = model
  exs = rows[0][:8]
  prompter = pipeline.Prompter(ours.tokenizer)
  result = evaluate.evaluate(ours, exs, prompter=prompter, method="loglik", batch_size=8,
                             progress=False)
  assert len(result.records) == 8 and result.summary["n_scored"] == 8
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  for record, ex in zip(result.records[:3], exs[:3]):
    prompt = prompter.ids(ex, with_options=False)
    for got, option in zip(record["output"], prompter.choice_ids(ex)):
      with torch.no_grad():
        logits = ref(torch.tensor([prompt + option])).logits[0].double()
      logp = torch.log_softmax(logits, -1)
      want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(option))
      assert got == pytest.approx(want, abs=1e-3)
    assert record["prediction"] == "ABCDEFGH"[int(np.argmax(record["output"]))]


def test_generation_end_to_end(rows, model, tmp_path):
  ours, _ = model
  mc, gen, shots = rows[0][:4], rows[1][:4], rows[2]
  prompter = pipeline.Prompter(ours.tokenizer, pipeline.PromptConfig(k_shot=2), shots)
  result = evaluate.evaluate(ours, mc + gen, prompter=prompter, method="generate", batch_size=8,
                             max_new_tokens=10, output_dir=tmp_path, progress=False)
  assert result.summary["n_scored"] == 8 and (tmp_path / "records.jsonl").exists()
  for r in result.records:
    assert r["output"] and r["score"] in (0.0, 1.0)
  # Greedy answers are the same as the plain generate API on the same prompts.
  texts = sm.generate(ours, [prompter.messages(e) for e in mc + gen], max_new_tokens=10)
  assert [r["output"] for r in result.records] == texts
