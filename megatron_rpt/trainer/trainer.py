"""The RPT training loop.

One step (:meth:`Trainer.train_step`): every rollout engine samples its own prompts ->
reward (-> dynamic sampling) -> the samples of a data-parallel replica's engines gathered on
its ranks -> advantages -> mini-batches -> old logprobs -> GRPO update(s) on Megatron ->
bridge sync; then metrics and one save decision per step. Everything else lives in the
modules this one composes (the rank layout of engines: rollout/layout.py).
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
from tqdm.auto import tqdm

from megatron_rpt.bridge import WeightBridge
from megatron_rpt.config import Config, ConfigError, dump_yaml, validate
from megatron_rpt.data import ProblemStream, load_tokenizer
from megatron_rpt.distributed import all_reduce_numbers, init_distributed
from megatron_rpt.errors import TrainingDiverged
from megatron_rpt.eval import evaluate_during_training
from megatron_rpt.eval.scaling import write_run_model
from megatron_rpt.model.build import build_model_chunks
from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.hf_config import load_hf_config
from megatron_rpt.model.zoo import resolve_model_dir
from megatron_rpt.reward import POLICY_REWARDS
from megatron_rpt.rl import check_context_parallel_config, dynamic_sampling_active, group_advantages
from megatron_rpt.rollout import make_engine
from megatron_rpt.rollout.handover import engine_awake
from megatron_rpt.rollout.layout import RolloutLayout
from megatron_rpt.rollout.vllm_engine import import_vllm
from megatron_rpt.topology import Topology
from megatron_rpt.trainer import checkpointing
from megatron_rpt.trainer.dense_reward import apply_policy_rewards
from megatron_rpt.trainer.metrics import MemoryReport, MetricsLogger, PhaseTimer
from megatron_rpt.trainer.mini_batches import (
    MiniBatch,
    engine_vs_policy_logprob_diff,
    merge_update_metrics,
    split_mini_batches,
)
from megatron_rpt.trainer.ntp import NTPStream, ntp_step
from megatron_rpt.trainer.optimizer import build_optimizer, check_optimizer_offload, wrap_ddp
from megatron_rpt.trainer.policy import MegatronPolicy
from megatron_rpt.trainer.resume import plan_resume
from megatron_rpt.trainer.rollout_phase import (
    RolloutGroup,
    gather_replica_batch,
    sample_engine_share,
    save_rollouts,
)
from megatron_rpt.trainer.run_lock import lock_run_dirs
from megatron_rpt.weights.load import load_hf_into_model, load_megatron_checkpoint

log = logging.getLogger("megatron_rpt")


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
        self.cfg = cfg
        # The NTP baseline samples nothing: it needs an engine (and the bridge into it) only to evaluate
        # during training. Without one it leaves the GPU memory vLLM would reserve to the policy.
        self.needs_engine = cfg.train.objective == "rpt" or cfg.train.eval_interval > 0
        if self.needs_engine and cfg.rollout.engine == "vllm":
            import_vllm()  # fail first, with the install line: nothing built, nothing written yet
        p = cfg.parallel
        if p.context_parallel > 1:  # needs TE attention and a CP-splittable loss aggregation
            check_context_parallel_config(cfg)
        check_optimizer_offload(cfg)  # GPU only: before anything is built or written
        init_distributed(p.tensor_parallel, p.pipeline_parallel, p.context_parallel, p.expert_parallel,
                         p.virtual_pipeline, seed=cfg.train.seed, timeout_minutes=p.distributed_timeout_minutes,
                         expert_tensor_parallel=p.expert_tensor_parallel)
        self.rank = dist.get_rank()
        # Read once; the policy, optimizer, loader, bridge, layout and checkpoints get it from here.
        self.topo = Topology.current()
        validate(cfg, world_size=dist.get_world_size())
        # Before anything is built: this run owns its directories, and what it resumes is verified.
        self.run_locks = lock_run_dirs(cfg)
        self.plan = plan_resume(cfg, resume, dist.get_world_size(), force=force_resume)
        self.dp_rank = self.topo.dp_rank
        self.dp_size = self.topo.dp_size
        # One engine per prompt stream: each draws its own prompts, its replica trains on them all.
        self.layout = RolloutLayout.build(cfg.parallel, cfg.rollout.tensor_parallel, self.topo)
        self.prompts_per_engine = cfg.rl.prompts_per_step // self.layout.engines

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
            self.reference = MegatronPolicy(cfg, self.arch, reference, optimizer=None, scheduler=None, topo=self.topo)
        chunks = wrap_ddp(chunks, cfg, self.topo)
        optimizer, scheduler = build_optimizer(chunks, cfg, self.topo)
        self.policy = MegatronPolicy(cfg, self.arch, chunks, optimizer, scheduler, topo=self.topo)
        self.memory = MemoryReport(cfg, self.arch, dist.get_world_size())  # planned vs measured, every step

        # Weights come from the bridge before the first rollout (run() syncs first).
        self.engine: Any = None
        self.bridge: WeightBridge | None = None
        if self.needs_engine:
            self.engine = make_engine(cfg, self.arch, self.tokenizer, model_dir=model_dir,
                                      engine_index=self.layout.engine, weights_from_bridge=True)
            self.bridge = WeightBridge(chunks, self.arch, bucket_mb=cfg.rollout.bucket_mb,
                                       dtype=DTYPES[cfg.rollout.dtype], topology=self.topo)
        if cfg.train.objective == "ntp":  # the baseline: every token of the same documents, LM loss
            self.stream: ProblemStream | NTPStream = NTPStream(cfg, self.tokenizer, dp_rank=self.dp_rank,
                                                               dp_size=self.dp_size)
        else:
            self.stream = ProblemStream(cfg.data, self.tokenizer, dp_rank=self.layout.engine,
                                        dp_size=self.layout.engines, split="train")
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
            write_run_model(cfg.logging.dir, self.arch.num_parameters(), str(model_dir) if model_dir else None,
                            cfg.model.hf_checkpoint or cfg.model.hf_config)  # what tools/plot.py counts
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
        if self.cfg.model.load:
            load_megatron_checkpoint(chunks, self.cfg.model.load)
        elif model_dir is not None:
            load_hf_into_model(chunks, model_dir, self.arch, topo=self.topo)
        elif not self.cfg.model.random_init:
            raise ConfigError("no initial weights: set model.hf_checkpoint or model.load, or model.random_init=true")

    def _resume(self) -> None:
        """Load the checkpoint :func:`plan_resume` verified (a failure here stops the run)."""
        path = self.plan.checkpoint
        state = checkpointing.load_checkpoint(path, self.policy.chunks, self.policy.optimizer, self.policy.scheduler,
                                              dp_cp_group=self.topo.dp_cp_group)
        self.step = int(state["step"])
        self.stream.load_state_dict(state["data"])
        self.resumed_from = str(path)
        self.plan.commit()
        if self.rank == 0:
            log.info("resumed from %s (step %d, run %s)", path, self.step, self.plan.run_id)

    def _save_due(self, stopping: bool) -> bool:
        """Save after this step? Every ``checkpoint.save_interval`` steps, and once the run ends (its
        last step, or a stop signal) when ``checkpoint.save_on_exit``."""
        c = self.cfg.checkpoint
        if not c.dir:
            return False
        on_interval = bool(c.save_interval) and self.step % c.save_interval == 0
        ending = stopping or self.step >= self.cfg.train.steps
        return on_interval or (ending and c.save_on_exit)

    def _save(self) -> None:
        if not self.cfg.checkpoint.dir:
            return
        with self.timer("checkpoint"):
            checkpointing.save_checkpoint(
                self.cfg.checkpoint.dir, self.step, self.policy.chunks, self.policy.optimizer, self.policy.scheduler,
                trainer_state={"data": self.stream.state_dict()}, keep_last=self.cfg.checkpoint.keep_last,
                async_queue=self.async_saves, info=self.plan.info, dp_cp_group=self.topo.dp_cp_group,
            )

    def _finish_saves(self, blocking: bool) -> None:
        """Finalise asynchronous saves whose background write is done (all of them if blocking)."""
        if self.async_saves is not None:
            self.async_saves.maybe_finalize_async_calls(blocking=blocking)

    # ------------------------------------------------------------------ the step

    def sync_weights(self) -> dict[str, float]:
        if self.bridge is None:  # NTP without in-training evaluation: no engine to sync
            return {}
        with self.timer("sync"):
            stats = self.bridge.sync(self.engine)
        return {"sync/gb_per_s": float(getattr(stats, "gb_per_s", float("nan")))}

    def train_step(self) -> dict[str, float]:
        """One RPT step: rollouts (each engine its own prompts) -> this replica's batch -> group
        advantages -> mini-batches -> old (and reference) logprobs -> one GRPO update per
        mini-batch (``rl.updates_per_batch`` passes) -> weight sync into the engine."""
        if self.cfg.train.objective == "ntp":
            return ntp_step(self)  # no rollouts; the engine is synced before an evaluation only
        groups, metrics = self._rollout()
        if self.cfg.rl.reward in POLICY_REWARDS:  # appendix A: P(y[0] | x<t) of the wrong predictions, from the policy
            metrics.update(apply_policy_rewards(self.cfg, groups, self.policy, self.tokenizer))
        mini_batches = self._mini_batches(groups, metrics)
        with self.timer("logprob"):
            metrics.update(self._score_old_policy(mini_batches))
        with self.timer("update"):
            steps = [self.policy.train_step(mb.micro_batches, mb.global_tokens, mb.global_seqs)
                     for _ in range(self.cfg.rl.updates_per_batch) for mb in mini_batches]
        metrics.update({f"train/{k}": v for k, v in merge_update_metrics(steps).items()})
        metrics.update(self.sync_weights())
        return metrics

    def _rollout(self) -> tuple[list[RolloutGroup], dict[str, float]]:
        """This engine's share (dynamic sampling per engine), saved, then gathered into the replica's batch."""
        cfg, layout = self.cfg, self.layout
        dynamic = dynamic_sampling_active(self.step, cfg.rl.dynamic_sampling_from_step)
        seed = cfg.rollout.seed + 1_000_003 * self.step + 101 * layout.engine
        with self.timer("rollout"):
            with engine_awake(self.engine, cfg.rollout.sleep_between_phases):
                share = sample_engine_share(cfg, self.engine, self.stream, self.prompts_per_engine, seed, dynamic)
            groups = gather_replica_batch(layout, share.kept)
        if cfg.logging.save_rollouts and layout.leader:
            save_rollouts(cfg.logging.dir, self.step + 1, layout.engine, share)  # 1-based, like metrics
        metrics = share.metrics(cfg)
        metrics.update(self.stream.mixture_metrics())  # data.mixture: share of problems drawn per corpus
        return groups, metrics

    def _mini_batches(self, groups: list[RolloutGroup], metrics: dict[str, float]) -> list[MiniBatch]:
        cfg = self.cfg
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
        advantages = group_advantages(rewards, normalize_std=cfg.rl.normalize_advantage_std).reshape(-1).tolist()
        samples = [(g.problem.prompt_ids, ids) for g in groups for ids in g.token_ids]
        engine_logprobs = [lp for g in groups for lp in g.engine_logprobs]
        # Global counts (identical on every rank) for the compute axis of the scaling fit: a
        # replica's batch counted once (data-parallel group), an engine's work once (its first rank).
        trained = sum(len(p) + len(r) for p, r in samples) * cfg.rl.updates_per_batch
        (metrics["compute/trained_tokens"],) = all_reduce_numbers([trained], group=self.topo.dp_group)
        generated = metrics["rollout/generated_tokens"] if self.layout.leader else 0.0
        (metrics["compute/generated_tokens"],) = all_reduce_numbers([generated])
        return split_mini_batches(samples, advantages, engine_logprobs, cfg.rl, self.topo.dp_group,
                                  packing=self.policy.packing)

    def _score_old_policy(self, mini_batches: list[MiniBatch]) -> dict[str, float]:
        """The behaviour policy's logprobs (and the reference's) on every micro-batch, and how far
        the engine's own logprobs are from them (float noise when the weight sync works)."""
        diffs = []
        for mb in mini_batches:
            old = self.policy.compute_logprobs(mb.micro_batches)  # None off the last pipeline stage
            mb.attach("old_logprobs", old)
            if old is not None:
                diffs.append(engine_vs_policy_logprob_diff(mb.micro_batches, mb.engine_logprobs))
            if self.reference is not None:
                mb.attach("ref_logprobs", self.reference.compute_logprobs(mb.micro_batches))
        return {"rollout/engine_logprob_abs_diff": max(diffs)} if diffs else {}

    def evaluate(self) -> dict[str, float]:
        """Validation metrics on the held-out split (collective: every rank calls it)."""
        if self.cfg.train.objective == "ntp":
            self.sync_weights()  # NTP steps leave the engine behind the policy
        with self.timer("eval"):
            return evaluate_during_training(self, self.step)

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
            engines = (f"{self.layout.engines} {cfg.rollout.engine} rollout engine(s) of "
                       f"{cfg.rollout.tensor_parallel} rank(s)" if self.needs_engine else
                       "no rollout engine (train.objective=ntp, train.eval_interval=0)")
            log.info("model %s (%.1fM params), %d-way TP, %d-way PP, %d-way DP, %s; %d steps from step %d",
                     self.arch.hf_architecture, self.arch.num_parameters() / 1e6, cfg.parallel.tensor_parallel,
                     cfg.parallel.pipeline_parallel, self.dp_size, engines, cfg.train.steps, self.step)
        self.sync_weights()
        self.timer.pop()
        progress = None
        if self.rank == 0 and cfg.logging.progress_bar:
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
            stopping = self.stop.agreed()
            if self._save_due(stopping):
                self._save()
            if stopping:
                exit_reason = "signal"
                break
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
