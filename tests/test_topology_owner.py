"""One owner for this rank's parallel layout: only the modules listed here touch Megatron's
``parallel_state``; everything else is handed a :class:`megatron_rpt.topology.Topology` (or one of
its process groups), so a layout question has one answer and a test can pass a hand-made one.

A static check of the package source (no torch.distributed, well under a second).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_rpt"

# Each one, and why it may read megatron.core.parallel_state.
ALLOWED = {
    "topology.py": "owns Topology: reads the sizes, ranks and groups once",
    "distributed.py": "sets the parallel state up (initialize_model_parallel) and tears it down",
    "model/build.py": "the stage flags (pre_process / post_process per virtual chunk) Megatron's constructors need",
}


def _parallel_state_uses(tree: ast.AST) -> list[int]:
    """Lines that import or name ``parallel_state`` (or its old alias ``mpu``) from megatron.core."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron.core"):
            if node.module.endswith("parallel_state") or any(a.name in ("parallel_state", "mpu") for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.Import):
            if any(a.name.startswith("megatron.core.parallel_state") for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "parallel_state":
            lines.append(node.lineno)
    return lines


def _uses_by_module() -> dict[str, list[int]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _parallel_state_uses(ast.parse(path.read_text(), filename=str(path)))
        if lines:
            out[path.relative_to(PACKAGE).as_posix()] = lines
    return out


def test_only_the_topology_owners_read_megatron_parallel_state():
    uses = _uses_by_module()
    stray = {module: lines for module, lines in uses.items() if module not in ALLOWED}
    assert not stray, (f"these modules read megatron.core.parallel_state (module: lines): {stray}; take a "
                       f"Topology (or its group) from the caller instead (megatron_rpt/topology.py)")
    # The list stays honest: an exception that no longer needs parallel_state leaves it.
    unused = sorted(set(ALLOWED) - set(uses))
    assert not unused, f"{unused} no longer read parallel_state: remove them from ALLOWED"


def test_the_scan_sees_each_way_of_reaching_parallel_state():
    """The check above is only as good as this detector (a hand-written case of each form)."""
    forms = ["from megatron.core import parallel_state", "from megatron.core import parallel_state as ps",
             "from megatron.core.parallel_state import get_data_parallel_group", "import megatron.core.parallel_state",
             "import megatron.core\nmegatron.core.parallel_state.get_data_parallel_rank()",
             "from megatron.core import mpu"]
    for source in forms:
        assert _parallel_state_uses(ast.parse(source)), source
    clean = "from megatron.core import tensor_parallel\nfrom megatron_rpt.topology import Topology\n"
    assert not _parallel_state_uses(ast.parse(clean))
