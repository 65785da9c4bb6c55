"""What the stages of one invocation share: where they run and what they measure.

    ctx = RunContext.start("auto")        # resolve --device, join torchrun's process group
    with ctx.stage("calibrate"): ...      # timed into ctx.timings
    ctx.report["quant_top1"] = ...        # the JSON report's keys (ouro.exporter.pipeline)

The artifacts themselves (model, QuantizedModel, evaluation data, exported graphs) are not kept
here: each stage takes them as arguments and returns what it produces (ouro.exporter.run wires them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ouro.calib.distributed import SINGLE, DistContext

__all__ = ["UserError", "RunContext", "StageTimer"]


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit code 2."""


@dataclass
class RunContext:
    """The environment of one run (device, torchrun processes) and what it records (timings,
    report). `is_main`: this process writes files and prints the tables."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: DistContext = SINGLE
    timings: dict[str, float] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    @classmethod
    def start(cls, device: str) -> RunContext:
        """Resolve `device` (auto, cpu, cuda, cuda:N) and join torchrun's process group when there is one."""
        from ouro.calib.device import resolve_device
        from ouro.calib.distributed import env_local_rank, init_distributed

        dev = resolve_device(device, env_local_rank())
        return cls(device=dev, dist=init_distributed(dev))

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def stage(self, name: str) -> StageTimer:
        return StageTimer(self.timings, name)


class StageTimer:
    """Context manager: wall seconds of a stage into timings[name]."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> StageTimer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        self.timings[self.name] = round(time.perf_counter() - self.t0, 3)
        return False
