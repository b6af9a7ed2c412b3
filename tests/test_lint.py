"""The linter (ruff.toml: pyflakes, pycodestyle at 120 columns, import sorting) passes on the repository."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO


def test_ruff_passes():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed here (pip install -e .[test] installs it)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
