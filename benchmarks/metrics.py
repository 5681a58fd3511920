"""Figures of a throttle's behaviour in one scope, computed from an audited timeline only.

The input is a :class:`~benchmarks.audit.ScopeTimeline` (see ``audit.py``): when each operation became
active (its first step started), when it ended (its last step ended), and how many operations were active
after each change. Times are server microseconds. Nothing here talks to Redis or a database, so these
functions can be unit-tested with hand-made timelines.

- :func:`handoff_samples_ms`: how long a freed slot stayed free before the next waiting operation started.
- :func:`idle_slot_fraction`: the share of slot-time left unused while operations were waiting.
- :func:`makespan_ratio`: the actual makespan over the best a zero-gap FIFO schedule could do.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from .audit import ScopeTimeline

__all__ = [
    "active_durations_us",
    "handoff_samples_ms",
    "ideal_makespan_us",
    "idle_slot_fraction",
    "makespan_ratio",
    "makespan_us",
    "percentile",
    "summarize_ms",
]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` (0..1) percentile, interpolating between the two closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    lower, upper = math.floor(position), math.ceil(position)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def summarize_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max of samples in milliseconds, rounded to 0.1 ms."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "p50": rounded(percentile(values, 0.50)),
        "p99": rounded(percentile(values, 0.99)),
        "max": rounded(max(values) if values else None),
    }


def handoff_samples_ms(timeline: ScopeTimeline) -> list[float]:
    """One sample per slot hand-off, in ms.

    With a limit of L, the first L activations need no free slot; after that, activation L+k can only
    use the slot freed by the k-th end. So, with activations and ends each sorted by time, the sample is
    ``activation[L + k] - end[k]`` (0 when the activation came first, e.g. when the limit was exceeded).
    """
    activations = sorted(t for t, _op in timeline.activations)
    ends = sorted(t for t, _op in timeline.ends)
    samples = []
    for k, end in enumerate(ends):
        index = timeline.limit + k
        if index >= len(activations):
            break
        samples.append(max(0, activations[index] - end) / 1000)
    return samples


def idle_slot_fraction(timeline: ScopeTimeline) -> float | None:
    """Unused slot-time between the first and the last activation, as a fraction of all slot-time then.

    Someone was waiting throughout that window (the last activation had not happened yet), so every
    moment with fewer than ``limit`` active operations is a slot the throttle left idle. The active count
    is a step function: ``timeline.samples`` holds its value after each change. None if the window is
    empty (fewer than two distinct activation times).
    """
    if not timeline.activations:
        return None
    start = min(t for t, _op in timeline.activations)
    stop = max(t for t, _op in timeline.activations)
    if stop <= start:
        return None
    idle_us = 0
    level, since = 0, start
    for t, active in sorted(timeline.samples, key=lambda sample: sample[0]):
        if t > start:
            segment_end = min(t, stop)
            idle_us += max(0, timeline.limit - level) * (segment_end - since)
            since = segment_end
        if t >= stop:
            break
        level = active
    idle_us += max(0, timeline.limit - level) * (stop - since)
    return idle_us / (timeline.limit * (stop - start))


def active_durations_us(timeline: ScopeTimeline) -> list[int]:
    """Each ended operation's active time (its end minus its first activation), in activation order."""
    first_activation: dict[str, int] = {}
    for t, op in sorted(timeline.activations):
        first_activation.setdefault(op, t)
    end_of = {op: t for t, op in timeline.ends}
    ordered = sorted((t, op) for op, t in first_activation.items() if op in end_of)
    return [end_of[op] - t for t, op in ordered]


def ideal_makespan_us(durations_us: Sequence[int], limit: int) -> int:
    """Makespan of running ``durations_us`` in this order on ``limit`` slots with no gap at all: each
    operation starts on the slot that frees first (a FIFO list schedule)."""
    if not durations_us:
        return 0
    slots = [0] * min(limit, len(durations_us))
    for duration in durations_us:
        free_at = heapq.heappop(slots)
        heapq.heappush(slots, free_at + duration)
    return max(slots)


def makespan_us(timeline: ScopeTimeline) -> int | None:
    """From the first activation to the last end; None if nothing both started and ended."""
    if not timeline.activations or not timeline.ends:
        return None
    return max(t for t, _op in timeline.ends) - min(t for t, _op in timeline.activations)


def makespan_ratio(timeline: ScopeTimeline) -> float | None:
    """Actual makespan over the ideal one of the same measured active durations (1.0 = no time lost)."""
    actual = makespan_us(timeline)
    ideal = ideal_makespan_us(active_durations_us(timeline), timeline.limit)
    if actual is None or ideal <= 0:
        return None
    return actual / ideal
