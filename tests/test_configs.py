"""The config reference cannot drift: every field of every config is described, every
description names a field, and docs/config.md is what the generator writes."""


from configs_loader import CONFIGS, load_config

from single_multi import configs

DOCS = CONFIGS.parent / "docs" / "config.md"


def test_every_config_file_is_in_the_reference():
  listed = {f for _, files in configs.SECTIONS for f in files}
  assert {p.name for p in CONFIGS.glob("*.py")} == listed


def test_every_field_is_documented_and_every_description_is_used():
  used = set()
  for path in sorted(CONFIGS.glob("*.py")):
    c = load_config(path.name)
    assert configs.undocumented(c) == [], path.name
    used |= set(configs.leaves(c))
  assert set(configs.FIELDS) - used == set()


def test_the_check_catches_a_new_undocumented_field():
  c = load_config("quickstart.py")
  c.distill.new_knob = 3
  c.another = "x"
  assert configs.undocumented(c) == ["another", "distill.new_knob"]


def test_docs_config_md_is_generated_from_the_configs():
  want = configs.reference(CONFIGS)
  assert DOCS.read_text() == want, ("docs/config.md is stale: run "
                                    "`python -m single_multi.configs > docs/config.md`")
  assert "**undocumented**" not in want
  assert "| `distill.method` |" in want and "`'multi_student_kd'`" in want  # bbh's value.
