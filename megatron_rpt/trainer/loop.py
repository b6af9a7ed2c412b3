"""The RPT training loop.

One step: stream problems -> rollout -> extract + reward -> (dynamic sampling) ->
advantages -> old logprobs -> GRPO update(s) on Megatron -> bridge sync -> metrics
(-> checkpoint). Everything else lives in the modules this one composes.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rpt.config import Config, ConfigError, dump_yaml, validate
from megatron_rpt.errors import TrainingDiverged
from megatron_rpt.trainer import checkpointing
from megatron_rpt.trainer.resume import plan_resume
from megatron_rpt.trainer.run_lock import lock_run_dirs
from megatron_rpt.trainer.metrics import MemoryReport, MetricsLogger, PhaseTimer
from megatron_rpt.distributed import all_reduce_numbers
from megatron_rpt.rl import response_values
from megatron_rpt.rollout.handover import sleep_engine, wake_engine
from megatron_rpt.trainer.rollout_phase import (
    collect_step_groups,
    hosts_engine,
    save_rollouts,
)

log = logging.getLogger("megatron_rpt")


def _split_evenly(n: int, parts: int) -> list[range]:
    """``parts`` contiguous index ranges covering ``range(n)`` (sizes differ by at most one)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def engine_vs_policy_logprob_diff(micro_batches: list[dict[str, torch.Tensor]],
                                  engine_logprobs: list[list[float]]) -> float:
    """Mean |engine logprob - Megatron logprob| over response tokens, at every temperature.

    The engine samples with the weights the bridge pushed; Megatron scores the same tokens with
    the weights it trains. Both are ``log_softmax(logits / T)`` of the sampled token (see
    rollout/base.py), so anything but float noise here means the weight sync is broken. With
    ``rollout.top_p < 1`` vLLM reports the log-probability renormalised over the nucleus: the
    metric then also holds the mean ``-log(nucleus mass)`` of the sampled positions (the
    built-in engine reports the pre-top-p value at any top_p).
    """
    policy = response_values(micro_batches, [mb["old_logprobs"] for mb in micro_batches])
    diffs = [(p.double() - torch.tensor(e, dtype=torch.float64)).abs() for p, e in zip(policy, engine_logprobs)]
    return float(torch.cat(diffs).mean()) if diffs else float("nan")


class _StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM preemption or time limit): save and exit at the next boundary."""

    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        if not self.raised:
            log.warning("received %s: will save a checkpoint and exit after the current phase",
                        signal.Signals(signum).name)
        self.raised = True

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled."""
        (flag,) = all_reduce_numbers([1.0 if self.raised else 0.0], op=dist.ReduceOp.MAX)
        return flag > 0


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = "auto", force_resume: bool = False):
        from megatron.core import parallel_state

        from megatron_rpt.bridge import WeightBridge
        from megatron_rpt.data import ProblemStream, load_tokenizer
        from megatron_rpt.distributed import init_distributed
        from megatron_rpt.model.build import DTYPES, build_model_chunks
        from megatron_rpt.model.hf_config import load_hf_config
        from megatron_rpt.model.zoo import resolve_model_dir
        from megatron_rpt.rollout import make_engine
        from megatron_rpt.trainer.optimizer import build_optimizer, wrap_ddp
        from megatron_rpt.trainer.policy import MegatronPolicy

        self.cfg = cfg
        p = cfg.parallel
        if p.context_parallel > 1:  # needs TE attention and a CP-splittable loss aggregation
            from megatron_rpt.rl import check_context_parallel_config

            check_context_parallel_config(cfg)
        init_distributed(p.tensor_parallel, p.pipeline_parallel, p.context_parallel, p.expert_parallel,
                         p.virtual_pipeline, seed=cfg.train.seed, timeout_minutes=p.distributed_timeout_minutes)
        self.rank = dist.get_rank()
        validate(cfg, world_size=dist.get_world_size())
        # Before anything is built: this run owns its directories, and what it resumes is verified.
        self.run_locks = lock_run_dirs(cfg)
        self.plan = plan_resume(cfg, resume, dist.get_world_size(), force=force_resume)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.prompts_per_rank = cfg.rl.prompts_per_step // self.dp_size

        model_dir = None
        if cfg.model.hf_checkpoint:
            model_dir = self._on_rank0_first(lambda: resolve_model_dir(cfg.model.hf_checkpoint, cfg.model.tokenizer))
        arch_source = cfg.model.hf_config or model_dir
        if not arch_source:
            raise ConfigError("set model.hf_config (a config.json) or model.hf_checkpoint (an HF model dir)")
        self.arch = load_hf_config(arch_source)
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or model_dir)
        self.model_dir = model_dir

        chunks = build_model_chunks(self.arch, cfg.model, cfg.parallel)
        self._load_initial_weights(chunks, model_dir)
        # KL to a reference: a frozen copy of the initial policy (never trained, never resumed).
        self.reference: MegatronPolicy | None = None
        if cfg.rl.kl_coef > 0:
            reference = build_model_chunks(self.arch, cfg.model, cfg.parallel,
                                           config_overrides={"perform_initialization": False})
            for ref_chunk, chunk in zip(reference, chunks):
                ref_chunk.load_state_dict(chunk.state_dict())
                ref_chunk.requires_grad_(False)
            self.reference = MegatronPolicy(cfg, self.arch, reference, optimizer=None, scheduler=None)
        chunks = wrap_ddp(chunks, cfg)
        optimizer, scheduler = build_optimizer(chunks, cfg)
        self.policy = MegatronPolicy(cfg, self.arch, chunks, optimizer, scheduler)
        self.memory = MemoryReport(cfg, self.arch, dist.get_world_size())  # planned vs measured, every step

        self.engine = make_engine(cfg, self.arch, self.tokenizer) if hosts_engine(cfg) else None
        self.bridge = WeightBridge(chunks, self.arch, bucket_mb=cfg.rollout.bucket_mb,
                                   dtype=DTYPES[cfg.rollout.dtype])
        self.stream = ProblemStream(cfg.data, self.tokenizer, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                    split="train")
        self.step = 0
        self.resumed_from: str | None = None
        if self.plan.checkpoint is not None:
            self._resume()
        self.metrics = MetricsLogger(
            cfg.logging.dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project, run_name=cfg.logging.wandb_run_name, config=cfg.to_dict(),
            enabled=self.rank == 0, start_step=self.step,
        )
        if self.rank == 0:
            Path(cfg.logging.dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.logging.dir) / "config.yaml").write_text(dump_yaml(cfg))
        self.stop = _StopFlag()
        self.timer = PhaseTimer()
        self.async_saves = checkpointing.new_async_queue() if cfg.checkpoint.async_save else None

    # ------------------------------------------------------------------ set-up helpers

    def _on_rank0_first(self, fn):
        """Run ``fn`` on rank 0 first (it may download / convert into a shared cache), then elsewhere."""
        result = fn() if self.rank == 0 else None
        dist.barrier()
        return result if self.rank == 0 else fn()

    def _load_initial_weights(self, chunks: list[Any], model_dir: Path | None) -> None:
        from megatron_rpt.model.loading import load_hf_into_model, load_megatron_checkpoint

        if self.cfg.model.load:
            load_megatron_checkpoint(chunks, self.cfg.model.load)
        elif model_dir is not None:
            load_hf_into_model(chunks, model_dir, self.arch)
        elif not self.cfg.model.random_init:
            raise ConfigError("no initial weights: set model.hf_checkpoint or model.load, or model.random_init=true")

    def _resume(self) -> None:
        """Load the checkpoint :func:`plan_resume` verified (a failure here stops the run)."""
        path = self.plan.checkpoint
        state = checkpointing.load_checkpoint(path, self.policy.model, self.policy.optimizer, self.policy.scheduler)
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self.resumed_from = str(path)
        self.plan.commit()
        if self.rank == 0:
            log.info("resumed from %s (step %d, run %s)", path, self.step, self.plan.run_id)

    def _save(self) -> None:
        if not self.cfg.checkpoint.dir:
            return
        with self.timer("checkpoint"):
            checkpointing.save_checkpoint(
                self.cfg.checkpoint.dir, self.step, self.policy.model, self.policy.optimizer, self.policy.scheduler,
                trainer_state={"data": self.stream.state_dict()}, keep_last=self.cfg.checkpoint.keep_last,
                async_queue=self.async_saves, info=self.plan.info,
            )

    def _finish_saves(self, blocking: bool) -> None:
        """Finalise asynchronous saves whose background write is done (all of them if blocking)."""
        if self.async_saves is not None:
            self.async_saves.maybe_finalize_async_calls(blocking=blocking)

    # ------------------------------------------------------------------ the step

    def sync_weights(self) -> dict[str, float]:
        with self.timer("sync"):
            stats = self.bridge.sync(self.engine)  # ranks without an engine still join the collectives
        return {"sync/gb_per_s": float(getattr(stats, "gb_per_s", float("nan")))}

    def train_step(self) -> dict[str, float]:
        from megatron_rpt.rl import build_micro_batches, dynamic_sampling_active, group_advantages

        cfg = self.cfg
        dynamic = dynamic_sampling_active(self.step, cfg.rl.dynamic_sampling_from_step)
        seed = cfg.rollout.seed + 1_000_003 * self.step + 101 * self.dp_rank
        with self.timer("rollout"):
            wake_engine(self.engine)  # empties PyTorch's CUDA cache first: the engine needs that memory
            groups, metrics = collect_step_groups(cfg, self.engine, self.stream, self.prompts_per_rank, seed, dynamic)
            sleep_engine(self.engine, cfg.rollout.sleep_between_phases)
        if cfg.logging.save_rollouts and self.engine is not None and self.rank == dist.get_global_rank(
                self._mp_group(), 0):
            save_rollouts(cfg.logging.dir, self.step + 1, self.dp_rank, groups)  # 1-based, like metrics

        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        advantages = group_advantages(rewards, normalize_std=cfg.rl.normalize_advantage_std).reshape(-1).tolist()
        samples = [(g.problem.prompt_ids, ids) for g in groups for ids in g.token_ids]
        engine_logprobs = [lp for g in groups for lp in g.engine_logprobs]
        trained_tokens = sum(len(p) + len(r) for p, r in samples) * cfg.rl.updates_per_batch
        global_trained, global_generated = all_reduce_numbers(
            [trained_tokens, metrics["rollout/generated_tokens"]], group=self._dp_group())
        # Global counts (identical on every rank) for the compute axis of the scaling fit.
        metrics["compute/trained_tokens"] = global_trained
        metrics["compute/generated_tokens"] = global_generated

        # Mini-batches: every one is an optimizer step whose loss is normalised over the tokens and
        # sequences of that mini-batch across all data-parallel ranks.
        mini_batches = []
        for part in _split_evenly(len(samples), cfg.rl.mini_batches_per_step):
            chunk = [samples[i] for i in part]
            micro = build_micro_batches(chunk, [advantages[i] for i in part],
                                        micro_batch_size=cfg.rl.micro_batch_size, pad_token_id=0,
                                        packing=self.policy.packing)
            tokens, seqs = all_reduce_numbers([sum(len(r) for _, r in chunk), len(chunk)], group=self._dp_group())
            mini_batches.append((micro, int(tokens), int(seqs), [engine_logprobs[i] for i in part]))

        with self.timer("logprob"):
            diffs = []
            for micro, _, _, engine_lp in mini_batches:
                old = self.policy.compute_logprobs(micro)
                for mb, lp in zip(micro, old or [torch.zeros_like(mb["loss_mask"], dtype=torch.float32)
                                                 for mb in micro]):
                    mb["old_logprobs"] = lp
                if old is not None:
                    diffs.append(engine_vs_policy_logprob_diff(micro, engine_lp))
                if self.reference is not None:
                    ref = self.reference.compute_logprobs(micro)
                    for mb, lp in zip(micro, ref or [torch.zeros_like(mb["loss_mask"], dtype=torch.float32)
                                                     for mb in micro]):
                        mb["ref_logprobs"] = lp
            if diffs:
                metrics["rollout/engine_logprob_abs_diff"] = max(diffs)

        with self.timer("update"):
            for _ in range(cfg.rl.updates_per_batch):
                for micro, tokens, seqs, _ in mini_batches:
                    train_metrics = self.policy.train_step(micro, tokens, seqs)
        metrics.update({f"train/{k}": v for k, v in train_metrics.items()})
        metrics.update(self.sync_weights())
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Validation metrics on the held-out split (collective: every rank calls it)."""
        from megatron_rpt.eval import evaluate_during_training

        with self.timer("eval"):
            return evaluate_during_training(self, self.step)

    def _mp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_model_parallel_group()

    def _dp_group(self):
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_group()

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average every metric over the ranks that reported it (loss metrics live on the last stage)."""
        gathered: list[dict[str, float]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, metrics)
        keys = sorted({k for m in gathered for k in m})
        out = {}
        for key in keys:
            vals = [m[key] for m in gathered if key in m and m[key] is not None and not math.isnan(m[key])]
            out[key] = sum(vals) / len(vals) if vals else float("nan")
        return out

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.rank == 0:
            log.info("model %s (%.1fM params), %d-way TP, %d-way PP, %d-way DP; %d steps from step %d",
                     self.arch.hf_architecture, self.arch.num_parameters() / 1e6, cfg.parallel.tensor_parallel,
                     cfg.parallel.pipeline_parallel, self.dp_size, cfg.train.steps, self.step)
        self.sync_weights()
        self.timer.pop()
        progress = None
        if self.rank == 0 and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.train.steps, initial=self.step, desc="rpt", dynamic_ncols=True)
        history: list[dict[str, float]] = []
        exit_reason = "completed"
        while self.step < cfg.train.steps:
            start = time.perf_counter()
            self._finish_saves(blocking=False)
            try:
                metrics = self.train_step()
            except TrainingDiverged as exc:  # the update was not applied; keep the last checkpoint
                self._finish_saves(blocking=True)
                raise TrainingDiverged(f"training diverged at step {self.step + 1}: {exc}; "
                                       f"{self._kept_checkpoint()}") from None
            self.step += 1
            diverged = self._diverged(metrics)  # before the reduction, which averages one rank's NaN away
            step_time = time.perf_counter() - start
            metrics.update({f"time/{k}": v for k, v in self.timer.pop().items()})
            metrics["time/step"] = step_time
            metrics.update(self.memory.metrics())
            metrics["throughput/generated_tokens_per_s"] = metrics.get("rollout/generated_tokens", 0.0) / max(
                metrics.get("time/rollout", step_time), 1e-9)
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and not diverged:
                metrics.update(self.evaluate())
            local = {k: metrics.get(k) for k in ("train/loss", "train/grad_norm")}
            metrics = self._reduce_metrics(metrics)
            self.metrics.log(self.step, metrics)
            history.append(metrics)
            if diverged:
                exit_reason = "diverged"
                break
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                     len=f"{metrics.get('response_length/mean', 0):.0f}")
            if self.stop.agreed():
                exit_reason = "signal"
                if cfg.checkpoint.save_on_exit:
                    self._save()
                break
            if cfg.checkpoint.dir and cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0:
                self._save()
        else:
            if cfg.checkpoint.dir and cfg.checkpoint.save_on_exit and (
                    not cfg.checkpoint.save_interval or self.step % cfg.checkpoint.save_interval):
                self._save()
        self._finish_saves(blocking=True)
        if self.async_saves is not None:
            self.async_saves.close()
        if progress is not None:
            progress.close()
        self.metrics.close()
        if exit_reason == "diverged":
            raise TrainingDiverged(self._divergence_message(local))
        return {"steps": self.step, "exit": exit_reason, "history": history, "resumed_from": self.resumed_from}

    # ------------------------------------------------------------------ divergence guard

    def _diverged(self, metrics: dict[str, float]) -> bool:
        """Collective: did the loss or gradient norm of this step stop being finite on any rank?"""
        bad = any(not math.isfinite(metrics.get(k, 0.0)) for k in ("train/loss", "train/grad_norm"))
        (flag,) = all_reduce_numbers([1.0 if bad else 0.0], op=dist.ReduceOp.MAX)
        return flag > 0

    def _kept_checkpoint(self) -> str:
        latest = Path(self.cfg.checkpoint.dir or "") / "latest"
        kept = (f"the last good checkpoint is {latest.parent / latest.read_text().strip()}"
                if self.cfg.checkpoint.dir and latest.is_file() else "no checkpoint was saved")
        return f"stopped without saving this state ({kept}); lower optim.lr or raise optim.warmup_steps, then resume"

    def _divergence_message(self, metrics: dict[str, float]) -> str:
        return (f"training diverged at step {self.step}: train/loss={metrics.get('train/loss')}, "
                f"train/grad_norm={metrics.get('train/grad_norm')}; {self._kept_checkpoint()}")
