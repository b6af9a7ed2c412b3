"""Repository hygiene: the linter (ruff.toml: pyflakes, pycodestyle at 120 columns, import sorting) passes, and
the test command runs every test file in at least one of its two environments."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import ANY_VERSION, REPO, SCOPES, VERSION_MATRIX


def test_ruff_passes():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed here (pip install -e .[test] installs it)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_test_file_runs_in_one_of_the_two_environments():
    """tools/setup_and_test.sh runs RPT_TEST_SCOPE=oldest on 0.16 and newest on 0.19: together, every file."""
    files = {p.name for p in (REPO / "tests").glob("test_*.py")}
    assert VERSION_MATRIX <= files and ANY_VERSION <= files, (VERSION_MATRIX | ANY_VERSION) - files
    assert not VERSION_MATRIX & ANY_VERSION
    oldest = {f for f in files if SCOPES["oldest"](f)}
    newest = {f for f in files if SCOPES["newest"](f)}
    assert oldest | newest == files and oldest & newest == VERSION_MATRIX
