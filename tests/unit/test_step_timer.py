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
