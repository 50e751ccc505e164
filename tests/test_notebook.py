"""notebooks/quickstart.ipynb runs top to bottom on CPU, offline (real SmolLM2 from the PyPI cache,
generated task families), and is committed without outputs."""

import json
import pathlib

import pytest


NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_committed_notebook_has_no_outputs():
  nb = json.loads(NOTEBOOK.read_text())
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("SINGLE_MULTI_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError (with the cell and its traceback) on any failing cell.
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  text = "\n".join(o.get("text", "") + json.dumps(o.get("data", {}))
                   for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "logit_fusion" in text and "round 1:" in text
  assert "of the tokens deferred" in text and "text/html" in text and "image/png" in text
  assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2
  assert (tmp_path / "co_llm" / "traces.html").exists()
