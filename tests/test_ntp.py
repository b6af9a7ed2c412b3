"""The next-token-prediction baseline (train.objective=ntp) on the real Megatron policy.

* the stream: windows of the train split's documents with EOS between them, each token a label
  once, the held-out documents never seen, exact resume (checked against the corpus by hand);
* the loss: the policy's LM step equals transformers' own causal-LM loss on the same weights;
* the toy task: NTP training learns the successor table (cross-entropy falls, held-out standard
  accuracy rises to near 1) -- the same policy, corpus and evaluation RPT uses;
* without in-training evaluation the baseline builds no rollout engine (vLLM would reserve GPU memory
  for nothing): it trains where vLLM cannot even be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_toy import metrics, toy_env, train, train_args

from megatron_rpt.config import load_config
from megatron_rpt.toy import prepare_toy

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return prepare_toy(tmp_path_factory.mktemp("toy") / "toy")


def _cfg(toy: Path, *sets: str):
    os.environ["RPT_TOY_DIR"] = str(toy)
    return load_config(REPO / "configs/toy_learn.yaml", ["train.objective=ntp", "ntp.seq_length=16", *sets],
                       validate_paths=False)


def test_stream_windows_cover_the_training_documents_once(toy):
    from megatron_rpt.data import load_tokenizer
    from megatron_rpt.data.corpus import heldout_doc_ids
    from megatron_rpt.trainer.ntp import NTPStream

    cfg = _cfg(toy)
    tok = load_tokenizer(toy / "tokenizer")
    rows = [json.loads(line) for line in (toy / "corpus.jsonl").read_text().splitlines()]
    held = heldout_doc_ids([f"corpus.jsonl:{i}" for i in range(len(rows))], cfg.data.val_documents, cfg.data.seed)
    expected: list[int] = []  # every training document in corpus order, EOS after each
    for i, row in enumerate(rows):
        if f"corpus.jsonl:{i}" not in held:
            expected += tok(row["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream = NTPStream(cfg, tok)
    windows = [stream.next_sequence() for _ in range(40)]
    assert all(len(w) == 17 for w in windows)
    # Consecutive windows share one token: tokens w[:-1] and labels w[1:] cover the text exactly once.
    joined = windows[0] + [t for w in windows[1:] for t in w[1:]]
    assert joined == expected[:len(joined)]
    # Resume mid-document: the next windows are the ones an uninterrupted stream gives.
    fresh = NTPStream(cfg, tok)
    head = [fresh.next_sequence() for _ in range(7)]
    state = json.loads(json.dumps(fresh.state_dict()))
    resumed = NTPStream(cfg, tok)
    resumed.load_state_dict(state)
    assert head + [resumed.next_sequence() for _ in range(10)] == windows[:17]


def _lm_worker(toy_dir: str) -> dict:
    from megatron_rpt.config import Config
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.trainer.ntp import lm_micro_batches
    from megatron_rpt.trainer.optimizer import build_optimizer, wrap_ddp
    from megatron_rpt.trainer.policy import MegatronPolicy
    from megatron_rpt.weights.load import load_hf_into_model

    init_distributed(1, 1)
    cfg = Config()
    cfg.model.make_vocab_size_divisible_by = 8
    cfg.rollout.temperature = 0.5  # the LM loss must not use the sampling temperature
    cfg.optim.lr = 1e-9
    model_dir = Path(toy_dir) / "model"
    arch = load_hf_config(model_dir)
    chunks = build_model_chunks(arch, cfg.model, cfg.parallel)
    load_hf_into_model(chunks, model_dir, arch)
    chunks = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg)
    policy = MegatronPolicy(cfg, arch, chunks, optimizer, scheduler)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 16, (6, 13), generator=g).tolist()
    metrics = policy.lm_train_step(lm_micro_batches(windows, 4), num_global_tokens=6 * 12)
    return {"windows": windows, "metrics": metrics}


def test_lm_step_loss_equals_transformers(toy):
    import transformers

    from megatron_rpt.distributed import spawn

    (result,) = spawn(_lm_worker, 1, str(toy))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(toy / "model"), dtype=torch.float64).eval()
    ids = torch.tensor(result["windows"])
    with torch.no_grad():
        reference = float(model(ids, labels=ids).loss)  # mean next-token cross-entropy, temperature 1
    # Two micro-batches (4 + 2 rows): their losses, each over the global token count, sum to the mean.
    assert result["metrics"]["loss"] == pytest.approx(reference, rel=1e-5)
    assert result["metrics"]["cross_entropy"] == pytest.approx(reference, rel=1e-5)
    assert result["metrics"]["num_tokens"] == 72


@pytest.mark.slow
def test_ntp_learns_the_toy_task(toy, tmp_path):
    run = tmp_path / "run"
    proc = train(toy, run, None, "train.objective=ntp", "train.steps=30", "train.eval_interval=30",
                 "ntp.seq_length=32", "ntp.sequences_per_step=16", "ntp.micro_batch_size=8",
                 f"eval.scorer_model={toy / 'model'}",  # the untrained model: every position is in the buckets
                 resume="none", timeout=600)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(r["compute/trained_tokens"] == 16 * 32 and r["compute/generated_tokens"] == 0 for r in rows)
    ce = [r["train/cross_entropy"] for r in rows]
    assert ce[0] > 2.5 and ce[-1] < 0.5 * ce[0], ce  # ln 17 = 2.83 at random
    # Held-out standard next-token accuracy after NTP: the successor of a letter is a function of it.
    assert rows[-1]["val/count_hard"] == 64 and rows[-1]["val/standard_acc_hard"] > 0.9, rows[-1]
    assert "cross-entropy    first" in proc.stdout


def test_ntp_without_evaluation_builds_no_rollout_engine(toy, tmp_path):
    run = tmp_path / "run"
    # `import vllm` fails in the trainer's process; an RPT run with rollout.engine=vllm stops there
    # (test_train_loop.py::test_main_job_without_vllm_says_how_to_install_it).
    code = ("import runpy, sys; sys.modules['vllm'] = None; "
            "runpy.run_module('megatron_rpt.trainer', run_name='__main__')")
    args = train_args(run, None, "train.objective=ntp", "train.steps=2", "train.eval_interval=0",
                      "rollout.engine=vllm", "ntp.seq_length=16", "ntp.sequences_per_step=4", resume="none")
    proc = subprocess.run([sys.executable, "-c", code, *args[2:]], cwd=REPO, env=toy_env(toy),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no rollout engine (train.objective=ntp, train.eval_interval=0)" in proc.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2]
