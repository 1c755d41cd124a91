"""notebooks/01_multimodal_alignment.ipynb runs top to bottom in a fresh kernel (this venv's Python) on tiny params."""

from __future__ import annotations

import json
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, TINY_PARAMS

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


def test_notebook_runs_on_tiny_params(kernel_name, tmp_path, monkeypatch):
    monkeypatch.setenv("MMALIGN_NB_PARAMS", json.dumps(TINY_PARAMS))
    monkeypatch.setenv("MMALIGN_NB_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells), "commit the notebook without outputs"

    # Raises CellExecutionError (with the cell and its traceback) on the first cell that fails.
    NotebookClient(nb, kernel_name=kernel_name, timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 6  # preview, 2 loss curves, R@1 vs dim, retrieval examples, gallery: each shown once
    text = "".join(o.get("text", "") for o in outputs)
    assert f"outputs: {tmp_path / 'work'}" in text and "distinct captions" in text
    assert (tmp_path / "work/models/projector/model.safetensors").exists()
