"""An independent auditor: every step start and end goes to a Redis stream, stamped by the server.

``AuditMiddleware`` records them in the worker, around the actor: "start" once every check before the
step has let it run, "end" (or "fail" for an attempt that will be retried) as soon as the actor's outcome
is known, before the operation's progress is recorded and anything is released. The auditor does not read
the throttle's data. From the stream alone it rebuilds, per scope, when each operation
was active (from its first step's start to its last step's end) and counts how many were active at every
instant. A worker killed by a test harness can write nothing more, so the harness appends a ``kill``
event for it: an operation whose step was running in that process is inactive from then until one of
its steps starts again (its step died with the process; the operation must be re-admitted to go on).

Stream order is the order the server received events in, so "A ended before B started" is exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from dramatiq.middleware import Middleware

from middleware.context import current_step
from middleware.plan import OPTION_OPERATION, OPTION_RESOURCE
from resources.redis_client import get_redis

__all__ = [
    "OPTION_AUDIT_LAST",
    "OPTION_AUDIT_STREAM",
    "AuditLog",
    "AuditMiddleware",
    "Event",
    "ScopeTimeline",
    "audit",
    "read_events",
]

#: Message options of audited steps: the stream to write to, and whether the step is its operation's last.
OPTION_AUDIT_STREAM = "audit_stream"
OPTION_AUDIT_LAST = "audit_last"

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
        # The worker's process group: a harness kills whole groups (the dramatiq master and its workers).
        args: list[object] = ["kind", kind, "pid", fields.pop("pid", os.getpgrp())]
        for name, value in fields.items():
            args += [name, "" if value is None else value]
        self._record(keys=[self.stream], args=args)


class AuditMiddleware(Middleware):
    """Writes the start and end of every audited step. Sits right after ``OperationTransitions`` in the
    middleware list: its before-hook runs after every admission check, its after-hook before any release."""

    def __init__(self) -> None:
        self._logs: dict[str, AuditLog] = {}

    def _log(self, stream: str) -> AuditLog:
        if stream not in self._logs:
            self._logs[stream] = AuditLog(get_redis(), stream)
        return self._logs[stream]

    def before_process_message(self, broker: Any, message: Any) -> None:
        stream = message.options.get(OPTION_AUDIT_STREAM)
        if stream:
            # The grant the step runs under: a later step under another grant means the operation lost its
            # slot in between (a step killed after its admission, before this line, leaves no other trace).
            fence = current_step().throttle_fence
            self._log(stream).record(
                "start", **_identity(message), attempt=message.options.get("retries", 0), fence=fence or 0
            )

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        stream = message.options.get(OPTION_AUDIT_STREAM)
        if not stream:
            return
        if exception is not None and not message.failed:
            self._log(stream).record("fail", **_identity(message))
            return
        # A step that failed for good ends its operation too.
        last = bool(message.options.get(OPTION_AUDIT_LAST)) or exception is not None
        self._log(stream).record("end", **_identity(message), last=int(last))


def _identity(message: Any) -> dict[str, object]:
    return {"op": message.options.get(OPTION_OPERATION, ""), "ref": message.options.get(OPTION_RESOURCE, "")}


@dataclass(frozen=True)
class Event:
    kind: str
    t_us: int
    pid: int
    op: str = ""
    ref: str = ""
    last: bool = False
    #: 0 for a step's first attempt, n for its n-th retry.
    attempt: int = 0
    #: On a start: the throttle grant the step runs under (0 when not throttled).
    fence: int = 0


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
                    attempt=int(fields.get("attempt") or 0),
                    fence=int(fields.get("fence") or 0),
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


def audit(
    events: Iterable[Event], scope_of: Mapping[str, str | Sequence[str]], limits: dict[str, int]
) -> dict[str, ScopeTimeline]:
    """Per scope, who was active when. ``scope_of`` maps a resource ref to its scope, or to the scopes
    its operations hold together (from the test's own set-up); ``limits`` maps each scope to its limit."""
    events = list(events)
    lost_after = _grants_lost(events)
    timelines = {scope: ScopeTimeline(scope, limit) for scope, limit in limits.items()}
    active: dict[str, set[str]] = {scope: set() for scope in limits}
    running_on: dict[str, int] = {}  # operation -> worker running its current step
    scopes_of_op: dict[str, tuple[str, ...]] = {}
    for event in events:
        if event.kind == "kill":
            for op, pid in list(running_on.items()):
                if pid == event.pid:
                    del running_on[op]
                    for scope in scopes_of_op[op]:
                        _deactivate(timelines[scope], active[scope], op, event.t_us)
            continue
        if not event.op or event.ref not in scope_of:
            continue
        scopes = scopes_of_op.setdefault(event.op, _as_tuple(scope_of[event.ref]))
        if event.kind == "start":
            running_on[event.op] = event.pid
            for scope in scopes:
                _activate(timelines[scope], active[scope], event.op, event.t_us)
        elif event.kind == "fail":
            running_on.pop(event.op, None)
            if id(event) in lost_after:
                for scope in scopes:
                    _deactivate(timelines[scope], active[scope], event.op, event.t_us)
        elif event.kind == "end":
            running_on.pop(event.op, None)
            if id(event) in lost_after and not event.last:
                for scope in scopes:
                    _deactivate(timelines[scope], active[scope], event.op, event.t_us)
            if event.last:
                for scope in scopes:
                    timelines[scope].ended.add(event.op)
                    timelines[scope].ends.append((event.t_us, event.op))
                    _deactivate(timelines[scope], active[scope], event.op, event.t_us)
    return timelines


def _grants_lost(events: list[Event]) -> set[int]:
    """The end or fail events after which their operation lost its grant: its next step started under
    another one. That happens when a later step was admitted and its worker killed before the step wrote
    its start; the lease expires and the slot goes to the next operation, so the operation must not count
    as active in between. A step continuing under the same grant keeps counting, so a slot given to two
    operations at once is still caught."""
    last_fence: dict[str, int] = {}
    last_outcome: dict[str, Event] = {}
    lost: set[int] = set()
    for event in events:
        if event.kind == "start" and event.fence:
            previous = last_fence.get(event.op)
            if previous is not None and previous != event.fence and event.op in last_outcome:
                lost.add(id(last_outcome[event.op]))
            last_fence[event.op] = event.fence
        elif event.kind in ("end", "fail") and event.op:
            last_outcome[event.op] = event
    return lost


def _as_tuple(scopes: str | Sequence[str]) -> tuple[str, ...]:
    return (scopes,) if isinstance(scopes, str) else tuple(scopes)


def _activate(timeline: ScopeTimeline, active: set[str], op: str, t_us: int) -> None:
    if op in active:
        return
    active.add(op)
    timeline.started.add(op)
    timeline.activations.append((t_us, op))
    timeline.samples.append((t_us, len(active)))
    timeline.max_active = max(timeline.max_active, len(active))
    if len(active) > timeline.limit:
        timeline.violations += 1


def _deactivate(timeline: ScopeTimeline, active: set[str], op: str, t_us: int) -> None:
    if op in active:
        active.discard(op)
        timeline.samples.append((t_us, len(active)))
