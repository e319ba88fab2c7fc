"""Where a generation's wall time goes: engine steps grouped by kind, with host and device time.

`Engine.step_timer` is None unless a caller (the throughput bench) attaches one. Each step is
timed on the host from entry to return. For steps that are not pipelined, CUDA events around the
program and the sampling also give the device time, so `wall - device` is what the device waited
for the host (scheduling, packing inputs, reading tokens, post-processing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Kinds of step, in the order a summary lists them.
PIPELINED = "decode, pipelined"  # launched before the previous step's tokens were read
DECODE = "decode"  # one token per sequence, not pipelined
MIXED = "mixed"  # prompt tokens (prefill chunks) with or without decode rows, not pipelined
MIXED_PIPELINED = "mixed, pipelined"
IDLE = "no work"  # nothing ran (e.g. only read a step in flight)
KINDS = (PIPELINED, DECODE, MIXED_PIPELINED, MIXED, IDLE)


@dataclass
class KindTotals:
    steps: int = 0
    wall_s: float = 0.0
    device_s: float = 0.0  # device time of the steps that have it (not pipelined, CUDA)
    timed_steps: int = 0  # steps with a device time
    rows: int = 0  # sequences run
    tokens: int = 0  # tokens computed


class StepTimer:
    def __init__(self) -> None:
        self.kinds: dict[str, KindTotals] = {}
        self.preempted = 0

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
