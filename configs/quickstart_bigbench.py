"""The embedded default on its earlier task: three BIG-bench families (English past tense, English
plural, sentence negation) instead of the generated ones, with the router's labels, its head's
L2 penalty and the distillation's learning rate it was chosen with ("best", none, 2e-3),
everything else as configs/quickstart.py.

This was the default until 2026-12-06, when the package index stopped offering the
`bigbench==1.0.0` sdist it read; docs/results.md keeps its measured run (chosen on dev rows, as
configs/quickstart.py's docstring describes). It needs the BIG-bench task files: the sdist where
the index still has it, else a checkout (`git clone https://github.com/google/BIG-bench`, then
`export SINGLE_MULTI_BIGBENCH=$PWD/BIG-bench` or `--config.data_manual_dir=...`).

Run: python -m single_multi.main --config=configs/quickstart_bigbench.py --workdir=/tmp/single_multi
"""

from single_multi import configs

FAMILIES = ("linguistic_mappings/past_tense_json", "linguistic_mappings/plural_json",
            "linguistic_mappings/sentence_negation_json")


def get_config():
  c = configs.load("quickstart.py", relative_to=__file__)
  c.specialists = tuple(f"bigbench:{f}" for f in FAMILIES)
  c.task = "bigbench:" + ",".join(FAMILIES)
  c.strategy_config.labels = "best"  # Chosen on its validation rows (generated families: tied).
  c.strategy_config.l2 = 0.0  # Its router had none (generated families: 1.0).
  c.distill.learning_rate = 2e-3  # Likewise (the generated families': 7e-4).
  return c
