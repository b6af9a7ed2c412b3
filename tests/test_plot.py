"""tools/plot.py: training curves and the scaling fit from a small synthetic metrics.jsonl."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plot_main():
    spec = importlib.util.spec_from_file_location("rpt_tools_plot", REPO / "tools" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture
def run_dir(tmp_path):
    """60 steps; hard-bucket accuracy follows P(C) = A / C^0.25 + 0.42 in the FLOPs the tool computes."""
    n_params = 2_000_000
    trained, generated = 5_000, 3_000
    per_step = 6 * n_params * trained + 2 * n_params * generated
    a = -0.3 * per_step ** 0.25
    rows = []
    for step in range(1, 61):
        c = per_step * step
        rows.append({
            "step": step, "reward/mean": 0.1 + 0.004 * step, "response_length/mean": 200.0 + step,
            "accuracy/easy": 0.6 + a / c ** 0.25, "accuracy/medium": 0.5 + a / c ** 0.25,
            "accuracy/hard": 0.42 + a / c ** 0.25,
            "compute/trained_tokens": trained, "compute/generated_tokens": generated,
        })
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 61, "rew')  # torn tail
    return run, n_params, a


def test_plot_run_writes_pngs_and_recovers_fit(run_dir, tmp_path, capsys):
    run, n_params, a = run_dir
    out = tmp_path / "plots"
    assert _plot_main()(["--run", str(run), "--out", str(out), "--num-params", str(n_params),
                         "--metric", "accuracy/{bucket}"]) == 0  # training accuracy: only when asked
    for name in ("training_curves.png", "scaling.png"):
        width, height = _png_size(out / name)
        assert width > 300 and height > 200
    summary = json.loads((out / "scaling.json").read_text())
    hard = summary["series"]["hard"]["fit"]
    assert hard["r2"] > 0.99
    assert hard["alpha"] == pytest.approx(0.25, rel=1e-3)
    assert hard["p_star"] == pytest.approx(0.42, abs=1e-4)
    assert hard["a"] == pytest.approx(a, rel=1e-2)
    assert "R²" in capsys.readouterr().out
    assert summary["metric"] == "accuracy/{bucket}" and "TRAINING" in summary["metric_meaning"]


def test_plot_refuses_training_accuracy_unless_asked(run_dir, tmp_path, capsys):
    run, n_params, _ = run_dir
    out = tmp_path / "plots"
    assert _plot_main()(["--run", str(run), "--out", str(out), "--num-params", str(n_params)]) == 0
    assert (out / "training_curves.png").is_file() and not (out / "scaling.png").exists()
    err = capsys.readouterr().err
    assert "no held-out accuracy" in err and "train.eval_interval" in err and "--metric" in err
    # Held-out accuracy logged every 20 steps: fitted by default, and named.
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:60]]
    for row in rows:
        if row["step"] % 20 == 0:
            row.update({f"val/reasoning_random1_{b}": row[f"accuracy/{b}"] for b in ("easy", "medium", "hard")})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _plot_main()(["--run", str(run), "--out", str(out), "--num-params", str(n_params)]) == 0
    summary = json.loads((out / "scaling.json").read_text())
    assert summary["metric"] == "val/reasoning_random1_{bucket}" and "held-out" in summary["metric_meaning"]
    assert [len(summary["series"][b]["points"]) for b in ("easy", "medium", "hard")] == [3, 3, 3]
    assert "fitting val/reasoning_random1_{bucket}" in capsys.readouterr().out


def test_plot_counts_the_model_the_run_recorded(run_dir, tmp_path):
    """A run of model.hf_checkpoint=auto:smollm2: the trainer's model.json gives N (no readable config.yaml path)."""
    from megatron_rpt.eval.plots import run_compute_model
    from megatron_rpt.eval.scaling import write_run_model

    run, _, _ = run_dir
    (run / "config.yaml").write_text("model:\n  hf_checkpoint: auto:smollm2\n  hf_config: ''\n")
    write_run_model(run, 134_515_008, "/cache/smollm2-135m-instruct", "auto:smollm2")
    assert run_compute_model(run).num_params == 134_515_008


def test_plot_points_file(tmp_path):
    compute = np.geomspace(1e19, 1e21, 6)
    points = [{"compute": float(c), "accuracy": float(0.5 - 30.0 / c ** 0.08), "series": "RPT-14B"} for c in compute]
    (tmp_path / "points.json").write_text(json.dumps(points))
    out = tmp_path / "out"
    assert _plot_main()(["--points", str(tmp_path / "points.json"), "--out", str(out)]) == 0
    _png_size(out / "scaling.png")
    fit = json.loads((out / "scaling.json").read_text())["series"]["RPT-14B"]["fit"]
    assert fit["r2"] > 0.99 and fit["alpha"] == pytest.approx(0.08, rel=1e-2)


def test_plot_clear_errors(tmp_path, capsys):
    assert _plot_main()(["--run", str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.1}) + "\n")
    # No model config to count parameters from: the error says how to give it.
    assert _plot_main()(["--run", str(run), "--metric", "accuracy/{bucket}"]) == 2
    assert "--num-params" in capsys.readouterr().err
