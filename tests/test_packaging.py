"""Installing the package prints no setuptools warning block (scripts/setup.sh runs on every
set-up): the metadata and the editable wheel build with every warning turned into an error."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_editable_build_emits_no_setuptools_warning(tmp_path):
    pytest.importorskip("setuptools")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "tl_reward", project / "tl_reward",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    meta, out = tmp_path / "meta", tmp_path / "out"
    meta.mkdir()
    out.mkdir()
    code = (
        "import warnings\n"
        "warnings.simplefilter('error')\n"
        "from setuptools import build_meta as b\n"
        f"b.prepare_metadata_for_build_editable({str(meta)!r})\n"
        f"b.build_editable({str(out)!r})\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Warning" not in res.stderr, res.stderr[-3000:]
    assert any(p.name.endswith(".whl") for p in out.iterdir()), sorted(p.name for p in out.iterdir())


def test_no_public_name_is_also_a_submodule_name():
    """A public function named like its submodule (``tl_reward.x`` the function, ``tl_reward/x.py``
    the module) is shadowed by the module once anything imports the module: ``from tl_reward
    import x`` would then give the module, depending on import order."""
    import pkgutil

    import tl_reward

    modules = {m.name for m in pkgutil.iter_modules(tl_reward.__path__)}
    assert not set(tl_reward._EXPORTS) & modules
