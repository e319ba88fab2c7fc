"""What the engine tells an observer about each step (the throughput bench's `StepTimer` is one).

The engine calls, per step: `step_started` on entry; `device_started` and `device_finished` around
the program and the sampling of a step that is not pipelined; `step_finished` with a `StepInfo`
before it returns. A step that raises is never finished. With no observer the engine does none of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kiln.runtime.scheduler import SchedulerOutput

# Kinds of step, in the order a summary lists them.
PIPELINED = "decode, pipelined"  # launched before the previous step's tokens were read
DECODE = "decode"  # one token per sequence, not pipelined
MIXED = "mixed"  # prompt tokens (prefill chunks) with or without decode rows, not pipelined
MIXED_PIPELINED = "mixed, pipelined"
IDLE = "no work"  # nothing ran (e.g. only read a step in flight)
KINDS = (PIPELINED, DECODE, MIXED_PIPELINED, MIXED, IDLE)


@dataclass(frozen=True, slots=True)
class StepInfo:
    kind: str  # one of KINDS
    rows: int  # sequences run
    tokens: int  # tokens computed
    preempted: int  # sequences the scheduler preempted to plan the step


def describe(plan: SchedulerOutput, pipelined: bool) -> StepInfo:
    """The StepInfo of a planned step."""
    rows, tokens = len(plan.chunks), plan.num_tokens
    if not plan.chunks:
        kind = IDLE
    elif tokens == rows and all(c.completes for c in plan.chunks):
        kind = PIPELINED if pipelined else DECODE
    else:
        kind = MIXED_PIPELINED if pipelined else MIXED
    return StepInfo(kind, rows, tokens, len(plan.preempted))


class StepObserver(Protocol):
    def step_started(self) -> None: ...

    def device_started(self) -> None: ...

    def device_finished(self) -> None: ...

    def step_finished(self, info: StepInfo) -> None: ...
