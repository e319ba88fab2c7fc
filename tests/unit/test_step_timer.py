"""StepTimer: totals per kind of engine step, and the summary the throughput bench reports."""

from __future__ import annotations

import pytest

from kiln.runtime.step_timer import MIXED, PIPELINED, StepTimer


def test_summary_groups_steps_by_kind_in_a_fixed_order():
    timer = StepTimer()
    timer.record(MIXED, 0.030, rows=3, tokens=2050, device_s=0.025, preempted=1)
    timer.record(PIPELINED, 0.010, rows=64, tokens=64)
    timer.record(MIXED, 0.050, rows=5, tokens=4000, device_s=0.045)
    timer.record(PIPELINED, 0.012, rows=62, tokens=62)
    summary = timer.summary()
    assert list(summary) == [PIPELINED, MIXED]  # DECODE never ran: not listed
    mixed = summary[MIXED]
    assert mixed["steps"] == 2 and mixed["rows"] == 8 and mixed["tokens"] == 6050
    assert mixed["ms_per_step"] == pytest.approx(40.0)
    assert mixed["device_ms_per_timed_step"] == pytest.approx(35.0)
    pipelined = summary[PIPELINED]
    assert pipelined["rows_per_step"] == pytest.approx(63.0) and pipelined["timed_steps"] == 0
    assert "device_ms_per_timed_step" not in pipelined
    assert timer.preempted == 1


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown step kind"):
        StepTimer().record("prefill", 0.1, rows=1, tokens=1)


def test_a_timer_observes_engine_steps_by_their_description():
    from kiln.runtime.scheduler import ScheduledChunk, SchedulerOutput
    from kiln.runtime.sequence import Sequence
    from kiln.runtime.step_observer import DECODE, IDLE, StepInfo, describe
    from kiln.sampling_params import SamplingParams

    decoding = Sequence("d", [1, 2, 3], SamplingParams())
    prompt = Sequence("p", list(range(10)), SamplingParams())
    decode_plan = SchedulerOutput([ScheduledChunk(decoding, 2, 1)])
    mixed_plan = SchedulerOutput([ScheduledChunk(decoding, 2, 1), ScheduledChunk(prompt, 0, 4)], [prompt])
    assert describe(decode_plan, pipelined=True).kind == PIPELINED
    assert describe(decode_plan, pipelined=False).kind == DECODE
    assert describe(mixed_plan, pipelined=False) == StepInfo(MIXED, rows=2, tokens=5, preempted=1)
    assert describe(SchedulerOutput(), pipelined=False).kind == IDLE

    timer = StepTimer()  # no CUDA device: wall time only
    for plan in (mixed_plan, decode_plan):
        timer.step_started()
        timer.device_started()
        timer.device_finished()
        timer.step_finished(describe(plan, pipelined=False))
    summary = timer.summary()
    assert list(summary) == [DECODE, MIXED] and timer.preempted == 1
    assert summary[MIXED]["tokens"] == 5 and summary[MIXED]["timed_steps"] == 0 and summary[MIXED]["wall_s"] >= 0
