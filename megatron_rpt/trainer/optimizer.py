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

from megatron_rpt.config import Config
from megatron_rpt.model.build import DTYPES
from megatron_rpt.topology import Topology

log = logging.getLogger(__name__)


def wrap_ddp(model_chunks: list[Any], cfg: Config) -> list[Any]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer(cfg),
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
                disable_bucketing=(i > 0) or Topology.current().pp_size > 1,
            )
        )
    return wrapped


def use_distributed_optimizer(cfg: Config) -> bool:
    """The distributed optimizer reduce-scatters gradients; gloo has no reduce-scatter, so on
    CPU with several data-parallel ranks it falls back to the replicated optimizer."""
    if not cfg.parallel.distributed_optimizer:
        return False
    if not torch.cuda.is_available() and Topology.current().dp_size > 1:
        log.warning("parallel.distributed_optimizer: gloo has no reduce-scatter; using the replicated optimizer on CPU")
        return False
    return True


def build_optimizer(model_chunks: list[Any], cfg: Config) -> tuple[Any, Any]:
    """(MegatronOptimizer, OptimizerParamScheduler) for DDP-wrapped ``model_chunks``."""
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
        use_distributed_optimizer=use_distributed_optimizer(cfg),
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
