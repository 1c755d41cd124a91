"""notebooks/01_multimodal_alignment.ipynb reads a workspace where the pipeline has run (tiny params here),
top to bottom in a fresh kernel (this venv's Python), without rebuilding features or training."""

from __future__ import annotations

import json
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, run_stages

NOTEBOOK = ROOT / "notebooks" / "01_multimodal_alignment.ipynb"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec that starts this interpreter, found through JUPYTER_PATH (so not whatever `python3` is)."""
    spec = tmp_path / "jupyter" / "kernels" / "mmalign-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mmalign test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "mmalign-test"


def test_notebook_reads_the_pipeline_outputs(kernel_name, tmp_path, tiny_params_file, mlflow_uri, monkeypatch):
    work = tiny_params_file.parent
    monkeypatch.chdir(work)
    run_stages(tiny_params_file)  # what `dvc repro` leaves in a workspace (no dvc.lock: the notebook says so)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = {p: p.stat().st_mtime_ns for p in (work / "data/features").rglob("*") if p.is_file()}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any(cell.get("outputs") for cell in nb.cells), "commit the notebook with its outputs (it reads on GitHub)"

    # Raises CellExecutionError (with the cell and its traceback) on the first cell that fails.
    NotebookClient(nb, kernel_name=kernel_name, timeout=120, resources={"metadata": {"path": str(work)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    # test images, align loss, R@1 by dim, project loss, gallery, audio R@1 by dim, audio gallery, search results
    assert len(figures) == 8
    text = "".join(o.get("text", "") for o in outputs) + "".join(o.get("data", {}).get("text/plain", "")
                                                                 for o in outputs)
    assert f"workspace: {work}" in text and "kept epoch" in text and "dvc repro" not in text.split("workspace:")[0]
    assert "No `dvc.lock` here" in "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "IProgress" not in text and "ipywidgets" not in text  # no widget bars or their warnings
    after = {p: p.stat().st_mtime_ns for p in (work / "data/features").rglob("*") if p.is_file()}
    assert after == before  # read, not rebuilt
