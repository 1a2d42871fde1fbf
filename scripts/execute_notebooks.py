"""Execute the notebooks in place and store them with their outputs, small enough for git.

    PYTHONPATH=$PWD .venv/bin/python scripts/execute_notebooks.py [notebooks/04_patching.ipynb ...]

Figures are stored as plotly's JSON (``PLOTLY_RENDERER=plotly_mimetype``: the data, not the
3.5 MB plotly.js library); a stream or text output longer than ``MAX_TEXT`` characters is cut.
Each notebook's metadata records ``tl_reward.source_sha256``, the hash of its code cells' sources
when it was executed: ``tests/test_notebooks.py`` fails when a code cell changed since (the
stored outputs are stale: run this script again).
"""

import hashlib
import os
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MAX_TEXT = 4000


def source_hash(nb) -> str:
    """sha256 of the code cells' sources, in order (markdown edits do not stale the outputs)."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode("utf-8") + b"\0")
    return h.hexdigest()


def _trim(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and len(out.get("text", "")) > MAX_TEXT:
                out["text"] = out["text"][:MAX_TEXT] + "\n... (cut)\n"
            data = out.get("data", {})
            for key in ("text/plain", "text/html"):
                if isinstance(data.get(key), str) and len(data[key]) > MAX_TEXT * 5:
                    data.pop("text/html", None)
                    if len(data.get("text/plain", "")) > MAX_TEXT:
                        data["text/plain"] = data["text/plain"][:MAX_TEXT] + "\n... (cut)"


def execute(path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype"
    os.environ.setdefault("TQDM_DISABLE", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    _trim(nb)
    nb.metadata.setdefault("tl_reward", {})["source_sha256"] = source_hash(nb)
    nbformat.write(nb, path)
    print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for p in paths:
        execute(p)
