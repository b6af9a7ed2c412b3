"""Shared fixtures: the read-only ../shared directory (skip clearly when absent)."""

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RPT_SHARED_DIR", REPO.parent / "shared"))

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def shared_path(rel: str) -> Path:
    """Path inside ../shared, or skip the test with the reason when it is missing."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs {p} (the project's read-only ../shared directory); not present on this machine")
    return p


@pytest.fixture
def shared():
    return shared_path
