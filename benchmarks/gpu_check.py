"""The one GPU run (``benchmarks/gpu.sh``): what only a GPU can show, in one JSON.

Stages, in order; each but the first two is a subprocess (its own CUDA context and timeout)
through the project's own command lines, and its JSON is merged into ``--out`` (rewritten
atomically after every stage, so a run cut short still leaves what it measured):

* ``env``: versions, device, compute capability, the fusion flags and FP8 gate this GPU gets;
* ``roofline``: an 8192^3 bf16 matmul (TFLOP/s, random data, CUDA events, median of 10 after
  3 warm-ups) and a device-to-device copy (GB/s), the ceilings the stages below are read against;
* ``convert``: ``tools/convert.py verify`` (Megatron on CUDA vs transformers in float32),
  ``hf-to-mcore`` on CUDA and ``verify`` of the converted checkpoint, on a random Qwen2;
* ``train``: GRPO steps on CUDA with the local spec, the built-in engine and bf16
  (``bench_train_step.py``): time per phase, tokens/s, MFU against the matmul above;
* ``sync``: the weight bridge into the engine on CUDA vs a device-to-device copy of the same
  bytes (``bench_weight_sync.py``, one rank);
* ``rollout``: the built-in engine vs transformers ``generate`` on CUDA in bf16 (``bench_rollout.py``).

``--dry-run`` runs the same stages and entry points on the CPU with tiny sizes (CI runs it).
Exit status 0 when every stage passed.

    python3 benchmarks/gpu_check.py --out OUT/gpu.json [--dry-run] [--budget-s 460]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_rpt.config import ModelConfig
from megatron_rpt.distributed import process_group_backend
from megatron_rpt.model.build import fusion_settings
from megatron_rpt.model.specs import fp8_hardware_problem
from megatron_rpt.toy import ALPHABET, prepare_toy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Sizes: (GPU, dry run). The train model is sized for MFU to mean something (~0.75B parameters,
# ~200k tokens per step), the sync model for a copy that takes milliseconds, not microseconds.
TRAIN_MODEL = ({"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8,
                "intermediate_size": 5632}, {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "intermediate_size": 128})
VERIFY_MODEL = ({"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
                 "intermediate_size": 2816, "vocab_size": 32000},
                {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128, "vocab_size": 512})


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("torch", "megatron-core", "transformers", "tokenizers", "safetensors", "numpy", "sentencepiece",
                 "transformer-engine", "vllm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def env_stage(dry: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    if not cuda and not dry:
        raise RuntimeError("no CUDA device: run benchmarks/gpu.sh on a GPU machine, or with --dry-run")
    info: dict[str, Any] = {"python": platform.python_version(), "versions": _versions(), "cuda": cuda,
                            "importable": {m: importlib.util.find_spec(m) is not None
                                           for m in ("transformer_engine", "vllm", "apex")},
                            "process_group_backend": process_group_backend(cuda),
                            "fusions_local_spec": fusion_settings(cuda, "local")}
    if cuda:
        capability = torch.cuda.get_device_capability()
        info.update(device=torch.cuda.get_device_name(), capability=list(capability),
                    memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                    torch_cuda=torch.version.cuda,
                    fp8_blockwise_problem=fp8_hardware_problem(ModelConfig(fp8="hybrid", fp8_recipe="blockwise"),
                                                               capability, torch.version.cuda))
    return info


def _median_seconds(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def roofline_stage(dry: bool) -> dict[str, Any]:
    device = "cpu" if dry else "cuda"
    n, dtype = (256, torch.float32) if dry else (8192, torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    matmul_s = _median_seconds(lambda: torch.mm(a, b), device)
    nbytes = (64 if dry else 4096) * 2**20
    src = torch.randn(nbytes // 2, device=device, dtype=torch.bfloat16, generator=gen)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device)
    return {"matmul": {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": matmul_s,
                       "tflops": 2 * n**3 / matmul_s / 1e12},
            "copy": {"bytes": nbytes, "seconds": copy_s, "gb_per_s": nbytes / copy_s / 1e9,
                     "read_plus_write_gb_per_s": 2 * nbytes / copy_s / 1e9}}


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one command line of the project; its last stdout line that parses as JSON, or the failure."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-1500:]
        return {"ok": False, "error": f"timed out after {timeout:.0f} s",
                "output_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    result: dict[str, Any] = {"ok": proc.returncode == 0, "returncode": proc.returncode,
                              "seconds": round(time.perf_counter() - start, 1)}
    for line in reversed(proc.stdout.splitlines()):
        try:
            result["report"] = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    if proc.returncode != 0:
        result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result


def _random_qwen2(out: Path, shape: dict[str, Any]) -> Path:
    config = Qwen2Config(max_position_embeddings=2048, tie_word_embeddings=False, **shape)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def convert_stage(dry: bool, work: Path, timeout: float) -> dict[str, Any]:
    hf = _random_qwen2(work / "verify_hf", VERIFY_MODEL[dry])
    deadline = time.monotonic() + timeout
    tool = [sys.executable, "tools/convert.py"]
    steps = {"verify_hf": tool + ["verify", "--hf", hf, "--seq-len", "64"],
             "hf_to_mcore": tool + ["hf-to-mcore", "--hf", hf, "--out", work / "verify_mcore", "--no-progress"],
             "verify_checkpoint": tool + ["verify", "--hf", hf, "--ckpt", work / "verify_mcore", "--seq-len", "64"]}
    if dry:  # the verify entry point runs in verify_checkpoint too; CI time is the cost of a third one
        del steps["verify_hf"]
    out: dict[str, Any] = {}
    for name, cmd in steps.items():
        out[name] = _run(cmd, deadline - time.monotonic())
        if not out[name]["ok"]:
            break
    out["ok"] = all(step.get("ok") for step in out.values()) and len(out) == len(steps)
    return out


def train_stage(dry: bool, work: Path, timeout: float, peak_tflops: float) -> dict[str, Any]:
    toy = prepare_toy(work / "toy", num_docs=64 if dry else 256, doc_len=40 if dry else 1100)
    vocab = len(ALPHABET) + 1  # the toy tokenizer's letters + end of text
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
              "eos_token_id": vocab - 1, "bos_token_id": vocab - 1, "max_position_embeddings": 2048,
              "rope_theta": 1e6, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, **TRAIN_MODEL[dry]}
    (work / "train_model").mkdir(exist_ok=True)
    (work / "train_model" / "config.json").write_text(json.dumps(config))
    sizes = (["data.max_prompt_tokens=24", "data.min_context_tokens=2", "rollout.max_response_tokens=2",
              "rl.prompts_per_step=4", "rollout.samples_per_prompt=4", "rl.micro_batch_size=16"] if dry else
             ["data.max_prompt_tokens=1024", "data.min_context_tokens=512", "rollout.max_response_tokens=32",
              "rollout.batch_size=256", "rl.prompts_per_step=32", "rl.micro_batch_size=8"])
    sets = ["model.hf_checkpoint=null", f"model.hf_config={work / 'train_model' / 'config.json'}",
            f"model.tokenizer={toy / 'tokenizer'}", "model.random_init=true", "model.params_dtype=bfloat16",
            "model.transformer_impl=local", "model.make_vocab_size_divisible_by=128", "rollout.dtype=bfloat16",
            f"data.paths=[{toy / 'corpus.jsonl'}]", *sizes]
    cmd = [sys.executable, "benchmarks/bench_train_step.py", "--config", "configs/toy_learn.yaml",
           "--steps", "1" if dry else "2", "--peak-tflops", f"{peak_tflops:.1f}", "--out", work / "train.json"]
    result = _run(cmd + [a for s in sets for a in ("--set", s)], timeout, env=dict(os.environ, RPT_TOY_DIR=str(toy)))
    if (work / "train.json").is_file():
        result["report"] = json.loads((work / "train.json").read_text())
        result["report"]["peak_tflops_source"] = "the roofline stage's matmul"
    return result


def sync_stage(dry: bool, work: Path, timeout: float) -> dict[str, Any]:
    size = ["--model", "small", "--layouts", "1x1", "--repeats", "1"] if dry else [
        "--model", "large", "--model-dtype", "bf16", "--layouts", "1x1:bf16", "--repeats", "5"]
    result = _run([sys.executable, "benchmarks/bench_weight_sync.py", "--ranks", "1", *size, "--out",
                   work / "sync.json"], timeout)
    if (work / "sync.json").is_file():
        result["report"] = json.loads((work / "sync.json").read_text())
    return result


def rollout_stage(dry: bool, work: Path, timeout: float) -> dict[str, Any]:
    size = (["--device", "cpu", "--threads", "1", "--batches", "1", "2", "--prompt-tokens", "8", "--new-tokens", "4",
             "--grpo", "1", "2", "8", "--repeats", "1", "--per-prompt-sample", "1"] if dry else
            ["--device", "cuda", "--size", "gpu", "--dtype", "bfloat16", "--repeats", "3"])
    result = _run([sys.executable, "benchmarks/bench_rollout.py", *size, "--out", work / "rollout.json"], timeout)
    if (work / "rollout.json").is_file():
        result["report"] = json.loads((work / "rollout.json").read_text())
    return result


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A short table of the headline numbers (what the device tool's output tail shows)."""
    s = data["stages"]
    lines = [f"gpu check ({'dry run, CPU' if data['dry_run'] else s.get('env', {}).get('device', '?')}): "
             f"{'all stages ok' if data['ok'] else 'FAILED: ' + ', '.join(k for k, v in s.items() if not v.get('ok'))}"]
    roof = s.get("roofline", {})
    if roof.get("ok"):
        lines.append(f"  matmul {roof['matmul']['tflops']:.1f} TFLOP/s, copy {roof['copy']['gb_per_s']:.0f} GB/s")
    verify = s.get("convert", {}).get("verify_checkpoint", {}).get("report")
    if verify:
        lines.append(f"  convert verify max |logit diff| {verify['max_abs_logit_diff']:.2e} (ok={verify['ok']})")
    train = s.get("train", {}).get("report")
    if train:
        mfu = train.get("mfu")
        lines.append(f"  train step {train['step_s']:.2f} s, {train['train_tokens_per_s']:.0f} tok/s, "
                     f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f} %'}")
    sync = s.get("sync", {}).get("report")
    if sync:
        row = sync["results"][0]
        lines.append(f"  sync {row['bridge_gbps']:.1f} GB/s = {100 * row['ratio_to_memcpy']:.0f} % of copy")
    rollout = s.get("rollout", {}).get("report")
    if rollout:
        lines += [f"  rollout {r['scenario']}: {r['speedup_vs_hf_batched']:.2f}x HF generate"
                  for r in rollout["results"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the one JSON file written")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on CPU with tiny sizes")
    parser.add_argument("--budget-s", type=float, default=460.0, help="wall-clock budget of all stages")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    start = time.monotonic()
    data: dict[str, Any] = {"dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {},
                            "ok": False}
    timeouts = {"convert": 150, "train": 210, "sync": 120, "rollout": 100}
    with tempfile.TemporaryDirectory(prefix="rpt_gpu_check_") as tmp:
        work = Path(tmp)
        for name in ("env", "roofline", "convert", "train", "sync", "rollout"):
            left = args.budget_s - (time.monotonic() - start)
            if left < 20:
                data["stages"][name] = {"ok": False, "error": f"skipped: the {args.budget_s:.0f} s budget is spent"}
                continue
            stage_start = time.monotonic()
            try:
                if name == "env":
                    result = {"ok": True, **env_stage(args.dry_run)}
                elif name == "roofline":
                    result = {"ok": True, **roofline_stage(args.dry_run)}
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()  # its 8 GiB of buffers back to the later stages' processes
                elif name == "train":
                    peak = data["stages"].get("roofline", {}).get("matmul", {}).get("tflops", 989.0)
                    result = train_stage(args.dry_run, work, min(timeouts[name], left), peak)
                else:
                    stage = {"convert": convert_stage, "sync": sync_stage, "rollout": rollout_stage}[name]
                    result = stage(args.dry_run, work, min(timeouts[name], left))
            except Exception as exc:  # noqa: BLE001 - record the failure, go on with the next stage
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            result["stage_seconds"] = round(time.monotonic() - stage_start, 1)
            data["stages"][name] = result
            print(f"[gpu-check] {name}: {'ok' if result.get('ok') else 'FAILED'} ({result['stage_seconds']} s)",
                  flush=True)
            _write(args.out, data)
    data["ok"] = all(stage.get("ok") for stage in data["stages"].values())
    data["seconds"] = round(time.monotonic() - start, 1)
    _write(args.out, data)
    print("\n".join(summary_lines(data)))
    print(f"wrote {args.out}")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
