"""Megatron DDP wrapping, distributed optimizer and LR schedule for the policy.

Owns: turning ``optim.*`` / ``parallel.*`` into Megatron's ``DistributedDataParallel``,
``get_megatron_optimizer`` and ``OptimizerParamScheduler``, and hooking
``finalize_model_grads`` into the model config so the pipeline schedules reduce
gradients across data-parallel and pipeline (tied-embedding) groups.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rpt.config import Config, ConfigError
from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.specs import transformer_engine_available
from megatron_rpt.topology import Topology

log = logging.getLogger(__name__)


def wrap_ddp(model_chunks: list[Any], cfg: Config, topo: Topology | None = None) -> list[Any]:
    """Megatron's DDP around each chunk; ``topo`` defaults to the one read from Megatron."""
    topo = topo if topo is not None else Topology.current()

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer(cfg, topo),
        check_for_nan_in_grad=True,
    )
    wrapped = []
    for i, chunk in enumerate(model_chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk's buckets may be skipped in overlap mode; harmless otherwise.
                disable_bucketing=(i > 0) or topo.pp_size > 1,
            )
        )
    return wrapped


def use_distributed_optimizer(cfg: Config, topo: Topology) -> bool:
    """The distributed optimizer reduce-scatters gradients; gloo has no reduce-scatter, so on
    CPU with several data-parallel ranks it falls back to the replicated optimizer."""
    if not cfg.parallel.distributed_optimizer:
        return False
    if not torch.cuda.is_available() and topo.dp_size > 1:
        log.warning("parallel.distributed_optimizer: gloo has no reduce-scatter; using the replicated optimizer on CPU")
        return False
    return True


def check_optimizer_offload(cfg: Config, on_gpu: bool | None = None, te_available: bool | None = None) -> None:
    """:class:`ConfigError` unless ``optim.cpu_offload`` can run here; checked before anything is built.

    megatron-core's HybridDeviceOptimizer moves the state between a GPU and the CPU (on a CPU-only
    machine it is in CPU memory already), and its path reuses the precision-aware optimizer, which
    megatron-core 0.16 accepts only with Transformer Engine >= 2.1 installed. ``on_gpu`` /
    ``te_available`` None: this machine's.
    """
    if not cfg.optim.cpu_offload:
        return
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    te_available = transformer_engine_available() if te_available is None else te_available
    if not on_gpu:
        raise ConfigError("optim.cpu_offload=true needs a GPU (it moves the optimizer state from the GPU to the CPU; "
                          "here there is no GPU and the state is in CPU memory already); set optim.cpu_offload=false")
    if not te_available:
        raise ConfigError("optim.cpu_offload=true needs Transformer Engine (megatron-core's offload reuses its "
                          "precision-aware optimizer), which is not installed; install it or set "
                          "optim.cpu_offload=false")


def offload_settings(cfg: Config) -> dict[str, Any]:
    """OptimizerConfig fields of ``optim.cpu_offload`` (the flags megatron-core documents for it)."""
    if not cfg.optim.cpu_offload:
        return {}
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=cfg.optim.offload_fraction,
                use_precision_aware_optimizer=True, overlap_cpu_optimizer_d2h_h2d=True)


def build_optimizer(model_chunks: list[Any], cfg: Config, topo: Topology | None = None) -> tuple[Any, Any]:
    """(MegatronOptimizer, OptimizerParamScheduler) for DDP-wrapped ``model_chunks``; ``topo`` as in
    :func:`wrap_ddp`."""

    o = cfg.optim
    dtype = cfg.model.params_dtype
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        params_dtype=DTYPES[dtype],
        use_distributed_optimizer=use_distributed_optimizer(cfg, topo if topo is not None else Topology.current()),
        **offload_settings(cfg),
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    steps = cfg.train.steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr if o.lr_schedule != "constant" else o.lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(steps, o.warmup_steps + 1),
        lr_decay_style=o.lr_schedule,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        # On resume the configured schedule wins over the checkpoint's (only the step count is
        # restored): a changed optim.* or train.steps applies, and the resume logs the change.
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )
    for chunk in model_chunks:
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        if len(model_chunks) == 1:
            config.no_sync_func = chunk.no_sync
    return optimizer, scheduler
