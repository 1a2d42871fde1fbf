"""The notebooks are stored executed (their outputs show on GitHub and in any viewer), their
stored outputs come from their current code, and they still execute top to bottom.

A stored notebook is stale when a code cell changed after it was executed: its metadata keeps the
hash of the code it was executed from (``scripts/execute_notebooks.py`` writes both). Re-run
``PYTHONPATH=$PWD .venv/bin/python scripts/execute_notebooks.py notebooks/NN_name.ipynb``.
"""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_BYTES = 600_000


def _script():
    spec = importlib.util.spec_from_file_location("execute_notebooks",
                                                  ROOT / "scripts" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _errors(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def _shape(nb) -> list[list[str]]:
    """Per code cell, the kinds of its non-stream outputs (what the code displays)."""
    return [[o["output_type"] for o in cell.get("outputs", []) if o["output_type"] != "stream"]
            for cell in nb.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_notebook_is_executed_and_current(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    fix = f"run: PYTHONPATH=$PWD .venv/bin/python scripts/execute_notebooks.py {path.relative_to(ROOT)}"
    assert all(c.get("execution_count") for c in code), f"{path.name} is stored unexecuted; {fix}"
    stored = nb.metadata.get("tl_reward", {}).get("source_sha256")
    assert stored == _script().source_hash(nb), (
        f"{path.name}: its code cells changed after its outputs were stored (stale); {fix}")
    assert not _errors(nb), f"{path.name} is stored with an error output"
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_and_shows_what_is_stored(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")  # as stored
    monkeypatch.setenv("TQDM_DISABLE", "1")
    stored = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    assert not _errors(nb), _errors(nb)
    assert _shape(nb) == _shape(stored), f"{path.name}: fresh outputs differ in kind from the stored"
    assert os.environ.get("PLOTLY_RENDERER") == "plotly_mimetype"


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ must hold the executed examples"
