"""Generated tokens/s of the built-in rollout engine vs ``transformers`` ``generate``.

Same random Qwen2-shaped model (~33M parameters, tied embeddings), same prompts, same
number of new tokens (EOS disabled so every row runs to ``--new-tokens``), sampling at
temperature 1. At batch B the built-in engine is compared with HF ``generate`` run on
the whole batch at once and with HF ``generate`` run prompt by prompt.

    python benchmarks/bench_rollout.py [--device cpu] [--out benchmarks/results/bench_rollout.json]

Prints a table and writes JSON (temp file, then rename). Issue #7 targets: >= 1x HF at
batch 1, >= 2x at batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.rollout import BuiltinEngine, SamplingParams

REPO = Path(__file__).resolve().parent.parent


def build_model(device: str) -> tuple[Qwen2ForCausalLM, Qwen2Config]:
    cfg = Qwen2Config(vocab_size=32000, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=1408, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval().to(device), cfg


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def hf_generate(model, prompts: torch.Tensor, new_tokens: int) -> None:
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == prompts.shape[1] + new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best-of timing repeats")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default); 1 is steadiest on a shared machine")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/bench_rollout.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, cfg = build_model(args.device)
    arch = arch_from_dict(cfg.to_dict(), source="bench model")
    engine = BuiltinEngine(arch, "float32", args.device, max_batch_size=max(args.batches),
                           max_seq_len=args.prompt_tokens + args.new_tokens, eos_token_ids=[])
    engine.update_weights(model.state_dict().items())
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=args.new_tokens, seed=0)
    gen = torch.Generator().manual_seed(1)

    rows = []
    for batch in args.batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_tokens), generator=gen).to(args.device)
        prompt_lists = prompts.tolist()
        tokens = batch * args.new_tokens
        # Warm up both paths once (allocator, kernels), then keep the best of `repeats`.
        engine.generate(prompt_lists[:1], SamplingParams(max_tokens=4))
        hf_generate(model, prompts[:1], 4)
        t_builtin = min(timed(lambda: engine.generate(prompt_lists, params), args.device) for _ in range(args.repeats))
        t_hf = min(timed(lambda: hf_generate(model, prompts, args.new_tokens), args.device) for _ in range(args.repeats))
        if batch == 1:
            t_hf_each = t_hf
        else:  # one prompt at a time: what a naive per-prompt loop costs
            t_hf_each = timed(lambda: [hf_generate(model, prompts[i:i + 1], args.new_tokens) for i in range(batch)],
                              args.device)
        rows.append({
            "batch": batch,
            "builtin_tok_s": tokens / t_builtin,
            "hf_batched_tok_s": tokens / t_hf,
            "hf_per_prompt_tok_s": tokens / t_hf_each,
            "speedup_vs_hf_batched": t_hf / t_builtin,
            "speedup_vs_hf_per_prompt": t_hf_each / t_builtin,
        })

    header = f"{'batch':>5} {'builtin tok/s':>14} {'HF batched':>11} {'HF per-prompt':>14} {'x batched':>10} {'x per-prompt':>13}"
    print(f"rollout throughput, {args.device}, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    print(header)
    for r in rows:
        print(f"{r['batch']:>5} {r['builtin_tok_s']:>14.1f} {r['hf_batched_tok_s']:>11.1f} {r['hf_per_prompt_tok_s']:>14.1f} "
              f"{r['speedup_vs_hf_batched']:>10.2f} {r['speedup_vs_hf_per_prompt']:>13.2f}")

    result = {
        "benchmark": "bench_rollout",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "model": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size},
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
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
