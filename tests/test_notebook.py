"""examples/feature_extraction.ipynb runs top to bottom on CPU with a tiny random model and writes its figures."""

import os
from pathlib import Path

import pytest

from tests.output_checks import assert_figure

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "feature_extraction.ipynb"


def test_feature_extraction_notebook_runs(tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("OPENUS_FIGURES_DIR", str(figures))
    monkeypatch.delenv("OPENUS_MODEL", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    assert_figure(figures / "cosine_similarity.png", (1100, 480))
    assert_figure(figures / "patch_token_pca.png", (1200, 400))
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "(30, " in outputs and "heuristic" in outputs and "pooled (30, 64)" in outputs
