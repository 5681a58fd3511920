"""An independent auditor: every step start and end goes to a Redis stream, stamped by the server.

It does not read the throttle's data. From the stream alone it rebuilds, per scope, when each operation
was active (from its first step's start to its last step's end) and counts how many were active at every
instant. A worker killed by a test harness can write nothing more, so the harness appends a ``kill``
event for it: an operation whose step was running in that process is inactive from then until one of
its steps starts again (its step died with the process; the operation must be re-admitted to go on).

Stream order is the order the server received events in, so "A ended before B started" is exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import redis

__all__ = ["AuditLog", "Event", "ScopeTimeline", "audit", "read_events"]

_RECORD = """
local t = redis.call('TIME')
return redis.call('XADD', KEYS[1], '*', 's', t[1], 'us', t[2], unpack(ARGV))
"""


class AuditLog:
    """Appends events to one stream."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream
        self._record = client.register_script(_RECORD)

    def record(self, kind: str, **fields: object) -> None:
        args: list[object] = ["kind", kind, "pid", fields.pop("pid", os.getpid())]
        for name, value in fields.items():
            args += [name, "" if value is None else value]
        self._record(keys=[self.stream], args=args)


@dataclass(frozen=True)
class Event:
    kind: str
    t_us: int
    pid: int
    op: str = ""
    ref: str = ""
    last: bool = False


def read_events(client: redis.Redis, stream: str) -> list[Event]:
    events: list[Event] = []
    start = "-"
    while True:
        batch = client.xrange(stream, min=start, count=5000)
        for entry_id, raw in batch:
            fields = {_text(k): _text(v) for k, v in raw.items()}
            events.append(
                Event(
                    kind=fields["kind"],
                    t_us=int(fields["s"]) * 1_000_000 + int(fields["us"]),
                    pid=int(fields.get("pid") or 0),
                    op=fields.get("op", ""),
                    ref=fields.get("ref", ""),
                    last=fields.get("last") == "1",
                )
            )
            start = "(" + _text(entry_id)
        if len(batch) < 5000:
            return events


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class ScopeTimeline:
    scope: str
    limit: int
    #: (time µs, active operations just after an event that changed the count)
    samples: list[tuple[int, int]] = field(default_factory=list)
    #: (time µs, operation) of every activation: a first start, or a start after a kill broke it.
    activations: list[tuple[int, str]] = field(default_factory=list)
    #: (time µs, operation) of every operation's end (its last step's end).
    ends: list[tuple[int, str]] = field(default_factory=list)
    max_active: int = 0
    #: Activations that took the scope over its limit.
    violations: int = 0
    started: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)


def audit(events: Iterable[Event], scope_of: dict[str, str], limits: dict[str, int]) -> dict[str, ScopeTimeline]:
    """Per scope, who was active when. ``scope_of`` maps a resource ref to its scope (from the test's own
    set-up), ``limits`` each scope to its limit."""
    timelines = {scope: ScopeTimeline(scope, limit) for scope, limit in limits.items()}
    active: dict[str, set[str]] = {scope: set() for scope in limits}
    running_on: dict[str, int] = {}  # operation -> pid running its current step
    scope_of_op: dict[str, str] = {}
    for event in events:
        if event.kind == "kill":
            for op, pid in list(running_on.items()):
                if pid == event.pid:
                    del running_on[op]
                    _deactivate(timelines, active, scope_of_op[op], op, event.t_us)
            continue
        if not event.op or event.ref not in scope_of:
            continue
        scope = scope_of_op.setdefault(event.op, scope_of[event.ref])
        timeline = timelines[scope]
        if event.kind == "start":
            running_on[event.op] = event.pid
            if event.op not in active[scope]:
                active[scope].add(event.op)
                timeline.started.add(event.op)
                timeline.activations.append((event.t_us, event.op))
                timeline.samples.append((event.t_us, len(active[scope])))
                timeline.max_active = max(timeline.max_active, len(active[scope]))
                if len(active[scope]) > timeline.limit:
                    timeline.violations += 1
        elif event.kind == "fail":
            running_on.pop(event.op, None)
        elif event.kind == "end":
            running_on.pop(event.op, None)
            if event.last:
                timeline.ended.add(event.op)
                timeline.ends.append((event.t_us, event.op))
                _deactivate(timelines, active, scope, event.op, event.t_us)
    return timelines


def _deactivate(
    timelines: dict[str, ScopeTimeline], active: dict[str, set[str]], scope: str, op: str, t_us: int
) -> None:
    if op in active[scope]:
        active[scope].discard(op)
        timelines[scope].samples.append((t_us, len(active[scope])))
