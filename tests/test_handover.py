"""GPU memory handover around rollouts (issue 11, item 4).

PyTorch's CUDA cache must be emptied before the rollout engine wakes up (vLLM's sleep-mode
allocator cannot use PyTorch's cached blocks) and again after the rollouts, before training.
On CPU there is no cache: the allocator queries are replaced by a recording stand-in with a
reserved-bytes counter, and the trainer's order of calls is recorded around a real step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_rpt.rollout import handover
from megatron_rpt.toy import prepare_toy

REPO = Path(__file__).resolve().parent.parent


class _Recorder:
    def __init__(self, events: list[str]):
        self.events = events

    def wake_up(self) -> None:
        self.events.append("wake_up")

    def sleep(self) -> None:
        self.events.append("sleep")


def test_cache_is_emptied_before_wake_up_and_after_sleep(monkeypatch):
    events: list[str] = []
    reserved = [40 * 2**30]  # 40 GiB held by PyTorch's cache after a training step

    def empty_cache() -> None:
        events.append("empty_cache")
        reserved[0] = 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: reserved[0])
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    handover.wake_engine(_Recorder(events))
    handover.sleep_engine(_Recorder(events), sleep=True)
    handover.sleep_engine(_Recorder(events), sleep=False)  # engine stays awake; the cache is still handed back
    assert events == ["empty_cache", "wake_up", "sleep", "empty_cache", "empty_cache"]
    reserved[0] = 40 * 2**30
    assert handover.release_cuda_cache() == 39 * 2**30


def test_cpu_has_no_cache_to_release():
    if torch.cuda.is_available():
        return
    assert handover.release_cuda_cache() == 0


def _trainer_step_events(toy: str, run: str) -> list[str]:
    os.environ["RPT_TOY_DIR"] = toy
    from megatron_rpt.config import load_config
    from megatron_rpt.trainer.trainer import Trainer

    cfg = load_config(REPO / "configs/toy_learn.yaml",
                      [f"logging.dir={run}", "logging.progress_bar=false", "train.steps=1", "train.eval_interval=0"])
    trainer = Trainer(cfg, resume=None)
    trainer.sync_weights()  # what run() does before the first step
    events: list[str] = []
    handover.release_cuda_cache = lambda: events.append("release") or 0  # the trainer calls it through handover
    engine = trainer.engine
    for name in ("wake_up", "sleep", "generate"):
        method = getattr(engine, name)
        setattr(engine, name, lambda *a, _m=method, _n=name, **k: (events.append(_n), _m(*a, **k))[1])
    trainer.train_step()
    return events


def test_trainer_releases_the_cache_around_the_rollout_phase(tmp_path):
    from megatron_rpt.distributed import spawn

    toy = prepare_toy(tmp_path / "toy")
    (events,) = spawn(_trainer_step_events, 1, str(toy), str(tmp_path / "run"))
    rollout = events[: events.index("sleep") + 2]
    assert rollout[:2] == ["release", "wake_up"], events
    assert "generate" in rollout and rollout[-2:] == ["sleep", "release"], events


def test_engine_awake_puts_the_engine_back_to_sleep_when_the_rollout_raises(monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(handover, "release_cuda_cache", lambda: events.append("release") or 0)
    try:
        with handover.engine_awake(_Recorder(events), sleep_after=True):
            events.append("generate")
            raise RuntimeError("a rollout failed")
    except RuntimeError:
        pass
    with handover.engine_awake(_Recorder(events), sleep_after=False):  # rollout.sleep_between_phases=false
        events.append("generate")
    with handover.engine_awake(None, sleep_after=True):  # no engine: the cache is still handed back
        events.append("nothing")
    assert events == ["release", "wake_up", "generate", "sleep", "release",
                      "release", "wake_up", "generate", "release",
                      "release", "nothing", "release"]
