"""The benchmark's figures, on hand-made audited timelines (no Redis, no workers)."""

from __future__ import annotations

import pytest

from benchmarks.audit import Event, ScopeTimeline, audit
from benchmarks.metrics import (
    active_durations_us,
    handoff_samples_ms,
    ideal_makespan_us,
    idle_slot_fraction,
    makespan_ratio,
    percentile,
    summarize_ms,
)

MS = 1000  # timelines are in microseconds


def _timeline(limit: int, runs: list[tuple[str, int, int]]) -> ScopeTimeline:
    """Audit one-step operations ``(op, start ms, end ms)`` in one scope, like the benchmark does."""
    events = []
    for op, start, end in runs:
        events.append(Event("start", start * MS, pid=1, op=op, ref=op))
        events.append(Event("end", end * MS, pid=1, op=op, ref=op, last=True))
    events.sort(key=lambda event: (event.t_us, event.kind == "start"))  # an end frees its slot first
    return audit(events, {op: "scope" for op, _s, _e in runs}, {"scope": limit})["scope"]


def test_a_perfect_throttle_hands_off_at_once_and_leaves_no_slot_idle():
    # Given limit 2 and four 100 ms operations, each waiting one starting the moment a slot frees
    timeline = _timeline(2, [("a", 0, 100), ("b", 0, 100), ("c", 100, 200), ("d", 100, 200)])

    # Then nothing was lost
    assert handoff_samples_ms(timeline) == [0, 0]
    assert idle_slot_fraction(timeline) == 0
    assert makespan_ratio(timeline) == 1


def test_gaps_show_in_handoffs_idle_slots_and_makespan():
    # Given limit 2, where c starts 10 ms after a ends and d 30 ms after b ends
    timeline = _timeline(2, [("a", 0, 100), ("b", 0, 100), ("c", 110, 210), ("d", 130, 230)])

    # Then the hand-offs are those gaps
    assert handoff_samples_ms(timeline) == [10, 30]
    # And over [0, 130] ms both slots were idle from 100 to 110 ms, and one from 110 to 130 ms
    assert idle_slot_fraction(timeline) == pytest.approx((2 * 10 + 1 * 20) / (2 * 130))
    # And the best schedule of four 100 ms operations on two slots takes 200 ms
    assert active_durations_us(timeline) == [100 * MS] * 4
    assert makespan_ratio(timeline) == pytest.approx(230 / 200)


def test_an_activation_before_the_end_it_pairs_with_counts_as_zero():
    # Given limit 1 exceeded: b starts while a still runs
    timeline = _timeline(1, [("a", 0, 100), ("b", 50, 150)])

    assert timeline.violations == 1
    assert handoff_samples_ms(timeline) == [0]


def test_idle_fraction_needs_a_window():
    assert idle_slot_fraction(_timeline(2, [("a", 0, 100)])) is None
    assert idle_slot_fraction(ScopeTimeline("empty", 2)) is None


def test_ideal_makespan_is_a_fifo_list_schedule():
    # 3 and 1 start at once; 2 goes on the slot freed at 1, 4 on the one freed at 3 -> ends at 7
    assert ideal_makespan_us([3, 1, 2, 4], 2) == 7
    assert ideal_makespan_us([5, 5], 4) == 5
    assert ideal_makespan_us([], 4) == 0


def test_percentiles_interpolate_between_ranks():
    assert percentile([], 0.5) is None
    assert percentile([4, 1, 3, 2], 0.5) == 2.5
    assert percentile([1, 2, 3, 4, 5], 0.99) == pytest.approx(4.96)
    assert summarize_ms([10, 20, 30]) == {"p50": 20, "p99": pytest.approx(29.8), "max": 30}


def _step(kind: str, ms: int, op: str, *, fence: int = 0, last: bool = False) -> Event:
    return Event(kind, ms * MS, pid=1, op=op, ref=op, last=last, fence=fence)


def test_an_operation_whose_next_step_runs_under_a_new_grant_had_lost_its_slot_in_between():
    # Given limit 1: A's first step under grant 1; its next step admitted and killed before it wrote its
    # start, so its lease expired and B got the slot (grant 2); A's step came back under grant 3
    events = [
        _step("start", 0, "a", fence=1),
        _step("end", 10, "a"),
        _step("start", 50, "b", fence=2),
        _step("end", 60, "b", last=True),
        _step("start", 70, "a", fence=3),
        _step("end", 80, "a", last=True),
    ]

    # Then that is no violation of the limit
    assert audit(events, {"a": "scope", "b": "scope"}, {"scope": 1})["scope"].violations == 0


def test_an_operation_continuing_under_the_same_grant_still_held_its_slot():
    # Given the same timeline, but A's next step under its first grant: B ran while A still held the slot
    events = [
        _step("start", 0, "a", fence=1),
        _step("end", 10, "a"),
        _step("start", 50, "b", fence=2),
        _step("end", 60, "b", last=True),
        _step("start", 70, "a", fence=1),
        _step("end", 80, "a", last=True),
    ]

    # Then the auditor reports it
    assert audit(events, {"a": "scope", "b": "scope"}, {"scope": 1})["scope"].violations == 1
