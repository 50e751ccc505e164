"""The entry points as a user runs them: `single_multi.chat` and `single_multi.main`."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import single_multi as sm
from single_multi import assets
from single_multi.models.gguf_file import GGUFFile
from single_multi.models.loading import gguf_tokenizer

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
  """A tiny random Llama with SmolLM2's real tokenizer and chat template, saved in HF format."""
  try:
    tokenizer = gguf_tokenizer(GGUFFile(assets.embedded_model_path("smollm2-135m-instruct")))
  except assets.AssetError as e:
    pytest.skip(f"embedded tokenizer unavailable: {e}")
  config = sm.ModelConfig(model_type="llama", vocab_size=49152, hidden_size=32,
                          intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, tie_word_embeddings=True, eos_token_ids=(2,),
                          bos_token_id=1, pad_token_id=2)
  params = sm.init_params(config, jax.random.key(0))
  return sm.save_hf(tmp_path_factory.mktemp("tiny_chat"), config, params, tokenizer=tokenizer)


def _run(*args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_chat_cli_writes_replies(tiny_chat_model, tmp_path):
  out = tmp_path / "replies.jsonl"
  proc = _run("single_multi.chat", f"--model={tiny_chat_model}", "--prompt=Hello there",
              "--prompt=Name a prime number.", "--max_new_tokens=4", "--batch_size=1",
              f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["Hello there", "Name a prime number."]
  assert all(isinstance(r["reply"], str) for r in records)
  assert ">>> Hello there" in proc.stdout
  assert "generating: 100%" in proc.stderr  # The progress bar ran over both batches.


def test_chat_cli_without_prompts_is_a_usage_error(tiny_chat_model):
  proc = _run("single_multi.chat", f"--model={tiny_chat_model}")
  assert proc.returncode != 0 and "give at least one --prompt" in proc.stderr


def test_main_runs_config_with_overrides_and_reads_its_compilation_cache(tiny_chat_model,
                                                                          tmp_path):
  """The second run reads the programs the first wrote to `jax_cache_dir` (every program is
  cached here: the minimum compile time is 0) and replies exactly as the first. JAX's compiler
  logs each persistent-cache hit at debug level."""
  cache, replies, hits = tmp_path / "jax", [], []
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
  for i in range(2):
    proc = _run("single_multi.main", "--config=configs/chat.py",
                f"--config.model={tiny_chat_model}", "--config.max_new_tokens=3",
                f"--config.jax_cache_dir={cache}", f"--workdir={tmp_path / str(i)}",
                env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / str(i) / "generations.jsonl").read_text().splitlines()
    replies.append([json.loads(line) for line in lines])
    hits.append(proc.stderr.count("Persistent compilation cache hit"))
  records = replies[0]
  assert len(records) == 5 and records[0]["prompt"] == "What is the capital of France?"
  assert replies[1] == replies[0]
  assert hits[0] == 0 and hits[1] > 0, hits
  assert any(cache.iterdir())


def test_compilation_cache_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.setenv("SINGLE_MULTI_CACHE", str(tmp_path))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  assert assets.compilation_cache_dir("auto") == str(tmp_path / "jax")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
  assert assets.compilation_cache_dir("auto") == "/elsewhere"
  assert assets.compilation_cache_dir("") is None
  assert assets.compilation_cache_dir("gs://bucket/jax") == "gs://bucket/jax"


def test_misspelled_override_fails_before_any_compute(tmp_path):
  proc = _run("single_multi.main", "--config=configs/quickstart.py", "--config.max_new_tokns=3",
              f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "max_new_tokns" in proc.stderr and 'Did you mean "max_new_tokens"' in proc.stderr
  assert not (tmp_path / "generations.jsonl").exists()


@pytest.mark.parametrize("override,message", [
    ("--config.batch_size=0", "batch_size=0 is not allowed: give an integer >= 1"),
    ("--config.k_shot=-1", "k_shot=-1 is not allowed: give an integer in [0, 64]"),
    ("--config.keep_checkpoints=0", "keep_checkpoints=0 is not allowed: give an integer >= 1"),
    ("--config.task=bigbench_knowlege", "unknown task 'bigbench_knowlege'"),
])
def test_bad_config_is_one_line_and_exit_2_before_anything_runs(tmp_path, override, message):
  workdir = tmp_path / "run"
  proc = _run("single_multi.main", "--config=configs/tiny.py", override, f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr and "Traceback" not in proc.stderr
  assert "--debug shows the traceback" in proc.stderr
  assert not workdir.exists()  # Nothing written, nothing loaded.
  debug = _run("single_multi.main", "--config=configs/tiny.py", override, "--debug",
               f"--workdir={workdir}")
  assert debug.returncode != 0 and "Traceback" in debug.stderr and message in debug.stderr


def test_second_run_on_a_locked_workdir_is_refused_in_one_line(tmp_path):
  import socket
  import time
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                     "heartbeat": time.time()})  # This (live) test process holds it.
  (workdir / "LOCK").write_text(lock)
  t0 = time.perf_counter()
  proc = _run("single_multi.main", "--config=configs/tiny.py", f"--workdir={workdir}")
  assert time.perf_counter() - t0 < 60  # Refused at once (the limit is start-up time on CI).
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"is in use by pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr
  assert sorted(p.name for p in workdir.iterdir()) == ["LOCK"]
  assert (workdir / "LOCK").read_text() == lock


def test_console_hides_library_info_and_the_run_log_keeps_it(tmp_path):
  import logging as std_logging

  from absl import logging as absl_logging

  from single_multi import main
  from single_multi.data import common

  def record(path, level, msg):
    return std_logging.LogRecord("absl", level, path, 1, msg, None, None)

  builder = "/venv/site-packages/tensorflow_datasets/core/dataset_builder.py"
  records = [record(builder, std_logging.INFO, "Generating dataset bigbench (/c/bigbench)"),
             record(builder, std_logging.WARNING, "Using custom data configuration: Bigbench"),
             record(builder, std_logging.WARNING, "a real TFDS warning"),
             record("/venv/site-packages/orbax/checkpoint/manager.py", std_logging.INFO, "saved"),
             record(str(ROOT / "single_multi" / "evolve.py"), std_logging.INFO, "round 0"),
             record(str(ROOT / "single_multi" / "data" / "common.py"), std_logging.INFO,
                    common.TFDS_PRINT + "Downloading and preparing dataset Unknown size")]
  assert [main.console_filter(r) for r in records] == [False, False, True, False, True, False]
  logger = absl_logging.get_absl_logger()
  handlers = list(logger.handlers)
  with main.log_file(str(tmp_path)) as path:
    for r in records:
      logger.handle(r)
  assert logger.handlers == handlers  # Detached again.
  text = path.read_text()
  assert path.name == "log.txt" and all(r.getMessage() in text for r in records)
  with main.log_file(str(tmp_path / "not_yet"), process=3) as other:  # Before process 0 makes it.
    assert other.name == "log.3.txt" and other.exists()
  with main.log_file("gs://bucket/run") as none:
    assert none is None
