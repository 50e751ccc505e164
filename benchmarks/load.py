"""Load SmolLM2-135M-Instruct from its GGUF: single_multi (-> JAX arrays) vs transformers (-> torch).

Each loader runs in a fresh subprocess (so peak RSS is its own), alternating, `--repeats` times;
the file is read once beforehand so both see a warm page cache. Times cover the load call only
(imports excluded), ours until the arrays are ready on the device. Last line: one JSON object.

  python benchmarks/load.py [--repeats=3]
"""

import argparse
import json
import statistics
import subprocess
import sys

from single_multi import assets

OURS = """
import resource, time, jax
import single_multi as sm
t = time.perf_counter()
model = sm.load({path!r}, tokenizer=False)
jax.block_until_ready(model.params)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

THEIRS = """
import resource, time, torch, transformers
transformers.utils.logging.disable_progress_bar()
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained({dir!r}, gguf_file={name!r},
                                                          dtype=torch.float32)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def _run(code: str) -> tuple[float, float]:
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  seconds, rss_mb = out.stdout.strip().splitlines()[-1].split()
  return float(seconds), float(rss_mb)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  path = assets.embedded_model_path("smollm2-135m-instruct")
  path.read_bytes()  # Warm the page cache for both loaders.
  ours, theirs = [], []
  for i in range(args.repeats):
    ours.append(_run(OURS.format(path=str(path))))
    theirs.append(_run(THEIRS.format(dir=str(path.parent), name=path.name)))
    print(f"repeat {i}: single_multi {ours[-1][0]:.2f}s, transformers {theirs[-1][0]:.2f}s",
          file=sys.stderr)
  ours_s = statistics.median(t for t, _ in ours)
  theirs_s = statistics.median(t for t, _ in theirs)
  print(json.dumps({
      "benchmark": "load_gguf_smollm2_135m",
      "file": path.name,
      "single_multi_s": round(ours_s, 3),
      "transformers_s": round(theirs_s, 3),
      "ratio_vs_transformers": round(ours_s / theirs_s, 3),
      "target_ratio": 0.5,
      "target_met": ours_s / theirs_s <= 0.5,
      "single_multi_peak_rss_mb": round(max(r for _, r in ours), 1),
      "transformers_peak_rss_mb": round(max(r for _, r in theirs), 1),
      "repeats": args.repeats,
  }))


if __name__ == "__main__":
  main()
