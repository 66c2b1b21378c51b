"""`make install` as a newcomer meets it: it installs the lock, and only the lock."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UV = ROOT / ".tools/bin/uv"
# What the Makefile's Python install reads: copied, so the repository's own files stay as they are.
INSTALL_FILES = (
    "Makefile",
    "dev.env",
    "pyproject.toml",
    "uv.lock",
    "requirements-uv.txt",
    "clients/python/pyproject.toml",
)

pytestmark = pytest.mark.skipif(not UV.exists(), reason="needs make install's uv (.tools)")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the install's inputs, with the repository's uv, made older than its pin."""
    for name in INSTALL_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / ".tools").symlink_to(ROOT / ".tools")
    os.utime(tmp_path / "requirements-uv.txt", (0, 0))  # the uv in .tools is up to date
    return tmp_path


def make_python_install(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", ".venv/.installed-python"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "UV_OFFLINE": "1"},
    )


def test_the_lock_matches_pyproject() -> None:
    checked = subprocess.run(
        [str(UV), "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_a_lock_that_does_not_match_pyproject_stops_the_install_in_one_line(
    project: Path,
) -> None:
    pyproject = project / "pyproject.toml"
    aiohttp = '    "aiohttp>=3.10",\n'
    assert aiohttp in pyproject.read_text()
    pyproject.write_text(pyproject.read_text().replace(aiohttp, aiohttp + '    "six",\n'))

    installed = make_python_install(project)

    assert installed.returncode != 0
    # Less make's own "make: *** [...] Error 1" (make[N]: when run from another make).
    lines = [line for line in installed.stderr.splitlines() if not line.startswith("make")]
    assert lines == [
        "uv.lock does not match pyproject.toml: run '.tools/bin/uv lock' (or 'make upgrade') "
        "and commit uv.lock"
    ]
    assert not (project / ".venv").exists()  # nothing was installed
