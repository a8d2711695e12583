"""The catalog's data ships inside the package and is found from a built (non-editable) copy."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "gapkit" / "catalog"


def package_data_globs() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs: list[str] = config["tool"]["setuptools"]["package-data"]["gapkit.catalog"]
    return globs


def test_pyproject_package_data_covers_every_catalog_data_file() -> None:
    globs = package_data_globs()
    files = sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "data").rglob("*") if p.is_file())
    assert files, "no data files"
    missing = [f for f in files
               if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert missing == []


@pytest.mark.slow
def test_the_catalog_works_from_a_built_copy_of_the_package(tmp_path: Path) -> None:
    """setuptools' build_py (what a wheel is made of) copies the data; the copy answers on its own."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copy(REPO / "README.md", source)
    shutil.copytree(REPO / "gapkit", source / "gapkit", ignore=shutil.ignore_patterns("__pycache__"))
    built = tmp_path / "lib"
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(built)], cwd=source, check=True, capture_output=True, timeout=120)
    assert (built / "gapkit" / "catalog" / "data" / "core-by-branch.tsv").is_file()
    probe = ("import gapkit.catalog as c; print(c.__file__); print(' '.join("
             "str(i.reference) for i in c.release('1.27').core_images() if i.name == 'pause'))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          check=True, timeout=60, env={"PYTHONPATH": str(built), "PATH": "/usr/bin:/bin"})
    where, pause = done.stdout.splitlines()
    assert where.startswith(str(built))
    assert pause == "registry.k8s.io/pause:3.7"
