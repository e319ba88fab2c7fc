"""Where a generation's wall time goes: engine steps grouped by kind, with host and device time.

A `StepTimer` is a step observer (`kiln.runtime.step_observer`) that a caller (the throughput bench)
sets as `Engine.step_observer`. Each step is timed on the host from entry to return. For steps that
are not pipelined on CUDA, events around the program and the sampling also give the device time, so
`wall - device` is what the device waited for the host (scheduling, packing inputs, reading tokens,
post-processing).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kiln.runtime.step_observer import DECODE, IDLE, KINDS, MIXED, MIXED_PIPELINED, PIPELINED, StepInfo

__all__ = ["DECODE", "IDLE", "KINDS", "MIXED", "MIXED_PIPELINED", "PIPELINED", "KindTotals", "StepTimer"]


@dataclass
class KindTotals:
    steps: int = 0
    wall_s: float = 0.0
    device_s: float = 0.0  # device time of the steps that have it (not pipelined, CUDA)
    timed_steps: int = 0  # steps with a device time
    rows: int = 0  # sequences run
    tokens: int = 0  # tokens computed


class StepTimer:
    """Totals per kind of step; given a CUDA device, device times of the steps that are not pipelined."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.kinds: dict[str, KindTotals] = {}
        self.preempted = 0
        self._cuda = device is not None and device.type == "cuda"
        self._start = 0.0
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    # ---- the engine's notifications (StepObserver) ----------------------------------------------------

    def step_started(self) -> None:
        self._start = time.perf_counter()
        self._events = None

    def device_started(self) -> None:
        if self._cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()

    def device_finished(self) -> None:
        if self._events is not None:
            self._events[1].record()

    def step_finished(self, info: StepInfo) -> None:
        wall = time.perf_counter() - self._start
        device_s = None
        if self._events is not None:
            begin, end = self._events
            self._events = None
            end.synchronize()
            device_s = begin.elapsed_time(end) / 1000
        self.record(info.kind, wall, info.rows, info.tokens, device_s, info.preempted)

    def record(
        self, kind: str, wall_s: float, rows: int, tokens: int, device_s: float | None = None, preempted: int = 0
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown step kind {kind!r}; expected one of {KINDS}")
        totals = self.kinds.setdefault(kind, KindTotals())
        totals.steps += 1
        totals.wall_s += wall_s
        totals.rows += rows
        totals.tokens += tokens
        if device_s is not None:
            totals.device_s += device_s
            totals.timed_steps += 1
        self.preempted += preempted

    def summary(self) -> dict[str, Any]:
        """Per kind: the totals, mean wall ms per step, rows and tokens per step, device ms per timed step."""
        out: dict[str, Any] = {}
        for kind in KINDS:
            t = self.kinds.get(kind)
            if t is None:
                continue
            row = asdict(t)
            row["ms_per_step"] = 1000 * t.wall_s / t.steps
            row["rows_per_step"] = t.rows / t.steps
            row["tokens_per_step"] = t.tokens / t.steps
            if t.timed_steps:
                row["device_ms_per_timed_step"] = 1000 * t.device_s / t.timed_steps
            out[kind] = row
        return out
