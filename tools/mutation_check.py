"""Plant known small bugs, one at a time, in a scratch copy of the repo and check that the tests catch each.

    python tools/mutation_check.py              # every mutant (about 10-20 minutes on 2 CPU cores)
    python tools/mutation_check.py --list       # the mutants and the tests that must catch them
    python tools/mutation_check.py --only qkv_k_v_swapped dp_factor_dropped

Run it after changing the trainer wiring, the bridge or its layouts, the loss or the reward, or
any test in the lists below (a refactor that moves a mutated line makes that mutant report
``stale``: update its snippet here). Each mutant is an exact text replacement in one file; the
scratch copy is the working tree (tracked and untracked, not ignored files), so uncommitted
changes are checked too. A mutant is *caught* when its tests fail (pytest exit 1), *survived*
when they pass. Exit status: 0 when every mutant is caught, 1 otherwise.

The list holds the planted bugs of issue 16 that the suite used to let through (advantages
normalised across prompts, the data-parallel factor dropped from the loss scale, K and V swapped
when the bridge exports q/k/v, ``>`` turned into ``>=`` at the difficulty thresholds) and ones it
already caught (reward, advantage normalisation, GRPO clipping, QKV fusing, top-16 entropy, the
bridge's TP merge, the bucket plan's expert offset).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``old`` (exactly once in ``path``) becomes ``new``; ``tests`` must fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTANTS = (
    Mutant("advantages_across_prompts", "megatron_rpt/trainer/trainer.py",
           "group_advantages(rewards, normalize_std=cfg.rl.normalize_advantage_std).reshape(-1)",
           "group_advantages(rewards.T.contiguous(), normalize_std=cfg.rl.normalize_advantage_std).T.reshape(-1)",
           ("tests/test_train_invariants.py",),
           "advantages normalised per sample index across prompts instead of within each prompt's group"),
    Mutant("dp_factor_dropped", "megatron_rpt/trainer/policy.py",
           'exactly 1.\n        """\n        micro_batches = self._same_count_over_data_parallel(micro_batches)\n'
           '        scale = grpo_loss_scale(len(micro_batches), self.dp_size)',
           'exactly 1.\n        """\n        micro_batches = self._same_count_over_data_parallel(micro_batches)\n'
           '        scale = grpo_loss_scale(len(micro_batches), 1)',
           ("tests/test_bridge.py::test_one_training_step_equals_transformers_gradient_and_adam_update",),
           "loss (and gradients) off by 1/dp: Adam hides it from the learning tests"),
    Mutant("qkv_k_v_swapped", "megatron_rpt/bridge/layouts.py",
           "q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)",
           "q, v, k = torch.split(grouped, [per_group * hd, hd, hd], dim=1)",
           ("tests/test_bridge.py::test_stream_is_the_original_safetensors_bit_for_bit",),
           "K and V swapped when the bridge un-fuses linear_qkv (every layout must see it)"),
    Mutant("threshold_inclusive", "megatron_rpt/eval/report.py",
           "math.isfinite(entropy) and entropy > threshold", "math.isfinite(entropy) and entropy >= threshold",
           ("tests/test_eval_report.py",), "an entropy exactly on 0.5 / 1.0 / 1.5 counted as above it"),
    Mutant("reward_off_boundary", "megatron_rpt/reward.py",
           "        if length == len(pred):\n            return 1.0",
           "        if length >= len(pred) - 1:\n            return 1.0",
           ("tests/test_reward.py",), "a prediction one byte past a token boundary rewarded"),
    Mutant("advantage_std_biased", "megatron_rpt/rl/advantages.py",
           "return centred / (std + eps) if normalize_std else centred",
           "return centred / (std * 0.9 + eps) if normalize_std else centred",
           ("tests/test_rl_advantages.py",), "advantages divided by a wrong std"),
    Mutant("clip_bounds_swapped", "megatron_rpt/rl/grpo_loss.py",
           "ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)",
           "ratio.clamp(1.0 - cfg.clip_high, 1.0 + cfg.clip_low)",
           ("tests/test_rl_grpo_loss.py",), "PPO clip range with clip_low and clip_high swapped"),
    Mutant("qkv_fuse_order", "megatron_rpt/bridge/layouts.py",
           "[q.reshape(groups, per_group * hd, *tail), k.reshape(groups, hd, *tail), v.reshape(groups, hd, *tail)]",
           "[q.reshape(groups, per_group * hd, *tail), v.reshape(groups, hd, *tail), k.reshape(groups, hd, *tail)]",
           ("tests/test_convert_layouts.py",), "HF q/k/v fused into linear_qkv in the wrong order"),
    Mutant("entropy_top_k_ignored", "megatron_rpt/data/entropy_filter.py",
           "top = x.topk(min(k, x.shape[-1]), dim=-1).values", "top = x",
           ("tests/test_data_entropy.py",), "entropy over the full vocabulary instead of the top 16"),
    Mutant("tp_merge_rank_order", "megatron_rpt/bridge/layouts.py",
           "dst.narrow(tmap.tp_dim, r * width, width).copy_(part)",
           "dst.narrow(tmap.tp_dim, (n - 1 - r) * width, width).copy_(part)",
           ("tests/test_convert_layouts.py",
            "tests/test_bridge.py::test_stream_is_the_original_safetensors_bit_for_bit"),
           "the bridge merges TP shards in reverse rank order"),
    Mutant("expert_offset_dropped", "megatron_rpt/bridge/buckets.py",
           "source_key = (tmap.mcore, layer, topo.ep_rank * n_local + expert)",
           "source_key = (tmap.mcore, layer, expert)",
           ("tests/test_bridge_buckets.py",), "every expert-parallel rank sends experts 0..n_local-1"),
)


def _scratch_copy(dest: Path) -> None:
    """The working tree (tracked + untracked, not ignored) copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
        elif src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / rel)
    shared = REPO.parent / "shared"  # tests find ../shared next to the repo unless RPT_SHARED_DIR says otherwise
    if shared.exists() and "RPT_SHARED_DIR" not in os.environ:
        os.environ["RPT_SHARED_DIR"] = str(shared.resolve())


def _plant(root: Path, mutant: Mutant) -> str | None:
    """Apply ``mutant`` under ``root``; the reason it cannot be applied, or None."""
    path = root / mutant.path
    if not path.is_file():
        return f"{mutant.path} does not exist"
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        return f"the snippet occurs {count} times in {mutant.path} (expected once): update the mutant"
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


def _run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> int:
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return -1


def check(mutant: Mutant, timeout: float) -> str:
    """``caught``, ``survived``, ``stale`` (the snippet moved) or ``error`` (tests could not run)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        root = Path(tmp)
        _scratch_copy(root)
        if _plant(root, mutant) is not None:
            return "stale"
        rc = _run_tests(root, mutant.tests, timeout)
    return {0: "survived", 1: "caught"}.get(rc, "error")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per mutant's test run")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTANTS}
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        print(f"mutation_check: unknown mutant(s) {', '.join(unknown)}; choose from {', '.join(sorted(names))}",
              file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.path}: {m.why}\n{'':28} tests: {' '.join(m.tests)}")
        return 0
    results = {}
    for m in chosen:
        start = time.monotonic()
        results[m.name] = check(m, args.timeout)
        print(f"{results[m.name]:9} {m.name:28} ({time.monotonic() - start:5.0f} s) {m.why}", flush=True)
    caught = sum(r == "caught" for r in results.values())
    print(f"mutation score: {caught} of {len(results)} planted bugs caught")
    for name, result in results.items():
        if result != "caught":
            print(f"  {name}: {result}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
