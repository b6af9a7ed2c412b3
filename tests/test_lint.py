"""Repository hygiene: the linter (ruff.toml: pyflakes, pycodestyle at 120 columns, import sorting) passes, and
the test command runs every test file in at least one of its two environments."""

import importlib.util
import runpy
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


# Light importers: the config check, data preparation, the planner and the rollout engines must not pay for
# megatron-core's seconds-long import (the modules that need it import it at the top).
LIGHT_PATHS = """
import runpy, sys
import megatron_rpt.config, megatron_rpt.data, megatron_rpt.memory_plan, megatron_rpt.rollout
import megatron_rpt.rollout.layout, megatron_rpt.processes, megatron_rpt.model.dtypes
for tool in ("tools/plan.py", "tools/prepare_data.py"):
    sys.argv = [tool, "--help"]
    try:
        runpy.run_path(tool, run_name="__main__")
    except SystemExit:
        pass
print(sorted(m for m in sys.modules if m.startswith("megatron.core")))
"""


def test_light_paths_do_not_import_megatron_core():
    proc = subprocess.run([sys.executable, "-c", LIGHT_PATHS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-4000:]


def test_every_planted_bug_of_the_mutation_check_still_applies():
    """tools/mutation_check.py replaces an exact snippet once per mutant: a refactor that moves the line makes
    the mutant stale (it would plant nothing). Caught here, in the test command, rather than when someone next
    runs the 10-20 minute check."""
    spec = importlib.util.spec_from_file_location("mutation_check", REPO / "tools" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["mutation_check"]
    counts = {m.name: (REPO / m.path).read_text().count(m.old) for m in module.MUTANTS}
    assert counts == {name: 1 for name in counts}, counts
    for mutant in module.MUTANTS:
        for test in mutant.tests:
            assert (REPO / test.split("::")[0]).is_file(), f"{mutant.name}: no test file {test}"


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_script_imports(script, monkeypatch, capsys):
    """The benchmarks are run by hand, rarely: a refactor that renames what one imports (bench_packing.py once
    imported a removed ``collect_step_groups``) must fail here, not when someone next measures. ``--help`` runs
    each script's imports and argument parser, nothing else."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "benchmarks" / script), run_name="__main__")
    assert exit_info.value.code == 0, capsys.readouterr().err[-4000:]
