"""Marks in Redis of the steps a chain has completed, so that a chained step costs no database transaction.

A step whose successor the same worker runs next (``chain``) must be recorded before that successor starts:
a crash must run again at most the step it interrupted. That record used to be a write transaction of its
own, four of them for a five-step sequence, each queueing for SQLite's one writer. It is now a mark in
Redis, the store that already holds the chain's unacknowledged message: a Redis that lost the mark has lost
the message that would act on it too. The database gets the marked steps later, in the transaction that
records the chain's last step, or the operation's failure, and every reader of an operation's progress
(``progress.check_step``, ``complete_step``, ``fail_operation``) takes the marks with the database's rows.

Something that ends an operation from outside its chain (a cancel, a sibling step failing in a group, the
janitor) first stops its chains (``stop_chains``): a mark is then refused, in the same script that would
make it, so the chain records its step in the database instead, where it finds the operation ended and goes
no further. The stop is written before the operation's end is committed, so no chain can miss it; one whose
end was then rolled back only stops chaining (its next step goes through the broker).

Two copies of one delivered step may run side by side (first steps sent twice). Only the first to finish goes on:
a mark refuses another copy's mark, and a copy recorded in the database (its successor sent, not run) first takes
the step (``take``), which refuses the others' marks too. A delivered step's mark is also refused once its
operation's in-flight set is gone, which its end drops: a copy that finishes after the end starts nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from redis.commands.core import Script

from resources.config import get_settings
from resources.redis_client import ScriptCall, pipelined, run_calls

from .redis_state import LazyRedis

__all__ = ["MARKS_TTL_S", "StepMarks", "completed_at"]

#: Longer than the longest delay Dramatiq allows (7 days): marks outlive the message that may act on them.
MARKS_TTL_S = 8 * 24 * 3600

#: In place of a completion time: a step taken by a completion recorded in the database (``take``).
_TAKEN = "-"

# Mark a step done ("<completion time> <marker>" as the value; "- <marker>" takes it), unless the operation's
# chains were stopped, its in-flight set is gone (KEYS[3], when given: the operation has ended, see ``record``) or
# another marker marked or took the step already (two copies of it ran side by side: only the first to finish goes
# on). The same marker marking again is accepted: its first call may have lost its reply. ARGV[5] = "read": the
# reply is the outcome and the operation's marks, for the caller that reads them next.
_RECORD = """
local function mark()
  if redis.call('exists', KEYS[2]) == 1 then return 0 end
  if KEYS[3] and redis.call('exists', KEYS[3]) == 0 then return 0 end
  if redis.call('hsetnx', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3]) == 0 then
    local current = redis.call('hget', KEYS[1], ARGV[1])
    if string.match(current, ' (%S+)$') ~= ARGV[3] then return 0 end
  end
  redis.call('expire', KEYS[1], ARGV[4])
  return 1
end
local marked = mark()
if ARGV[5] == 'read' then return {marked, redis.call('hgetall', KEYS[1])} end
return marked
"""


class StepMarks(LazyRedis):
    """The marked steps of each operation: ``<namespace>:steps:<operation id>`` (a hash of plan path →
    completion time and marker) and its stop flag (``…:stopped``)."""

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = prefix
        self._record_script: Script | None = None

    def _key(self, operation_id: str) -> str:
        prefix = self._prefix or f"{get_settings().namespace}:steps"
        return f"{prefix}:{operation_id}"

    def record(
        self,
        operation_id: str,
        path: str,
        marker: str | None = None,
        at: float | None = None,
        *,
        along: Sequence[ScriptCall] = (),
        alive_key: str | None = None,
    ) -> bool:
        """Mark step ``path`` done (at ``at``, seconds since the epoch; now by default); False, marking nothing,
        once the operation's chains were stopped or when another ``marker`` (a name for this completion of the
        step: the same on a retry of the call, another for each copy of the step) marked or took it already. The
        caller then records the step in the database, which finds it ended or done and starts nothing. ``along``:
        calls to make first, in the same round trip (see ``run_calls``), whatever the mark comes to.

        ``alive_key``: a key that exists for as long as the operation runs and is dropped, on the marks' server and
        with its marks, once it has ended (its in-flight set, see ``middleware.inflight``); no mark without it. A
        mark made with it then tells the caller, with no read of the database, that no other copy of the step
        completed: that copy would have marked or taken it first (``take``), or ended the operation, its marks and
        this key then dropped together."""
        (marked,) = self._run(operation_id, path, marker, at, along=along, alive_key=alive_key)[-1:]
        return bool(marked)

    def take(self, operation_id: str, path: str, marker: str) -> tuple[bool, dict[str, datetime]]:
        """Take step ``path`` for a completion recorded in the database next, and read the operation's marks, in one
        round trip: False when another ``marker`` holds the step (a mark, or a take). Taken first, so that another
        copy of the step, finishing later, finds the step taken and goes no further: it may be one that would
        otherwise run the step's successor itself. A take is no mark: the marks read leave it out, so that no
        other step's record writes it to the database for it (this completion's record does, and finds out there
        whether another copy's record came first)."""
        ((marked, reply),) = self._run(operation_id, path, marker, None, taken=True)[-1:]
        return bool(marked), _marks_of(reply)

    def _run(
        self,
        operation_id: str,
        path: str,
        marker: str | None,
        at: float | None,
        *,
        along: Sequence[ScriptCall] = (),
        alive_key: str | None = None,
        taken: bool = False,
    ) -> list[Any]:
        if self._record_script is None:
            self._record_script = self.client.register_script(_RECORD)
        key = self._key(operation_id)
        when = _TAKEN if taken else repr(time.time() if at is None else at)
        keys = (key, f"{key}:stopped", *((alive_key,) if alive_key else ()))
        args = (path, when, marker or uuid.uuid4().hex, MARKS_TTL_S, "read" if taken else "")
        return run_calls(self.client, [*along, ScriptCall(self._record_script, keys, args)])

    def paths(self, operation_id: str) -> dict[str, datetime]:
        """The operation's marked steps, with the time (naive UTC, as the models store it) each completed."""
        # In a round trip of the project's client, not as a command of redis-py's: once per delivered step.
        (reply,) = pipelined(self.client, [("HGETALL", self._key(operation_id))])
        if isinstance(reply, Exception):
            raise reply
        return _marks_of(reply)

    def stop_chains(self, operation_id: str) -> None:
        """Refuse every later mark of the operation: its running chains stop before their next step. Kept
        until it expires: a chain may be in the middle of a long step when the operation ends."""
        self.client.set(f"{self._key(operation_id)}:stopped", 1, ex=MARKS_TTL_S)

    def unmark(self, operation_id: str, path: str) -> None:
        """Take back the mark of a step that turned out to be a duplicate (see ``OperationTransitions``)."""
        self.client.hdel(self._key(operation_id), path)

    def keys_of(self, operation_id: str) -> list[str]:
        """The keys of the operation's marks that go once it has ended (not its stop flag: a chain in the middle
        of a long step must still find it)."""
        return [self._key(operation_id)]

    def forget(self, operation_id: str) -> None:
        """The operation has ended and its marks are in the database: drop them (they would expire anyway)."""
        self.client.delete(*self.keys_of(operation_id))


def _marks_of(reply: Any) -> dict[str, datetime]:
    """A marks hash as HGETALL returns it (a dict, or a flat list from a script) → path → completion time."""
    marks = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    times = {path: value.split(" ", 1)[0] for path, value in marks.items()}
    return {path: completed_at(float(when)) for path, when in times.items() if when != _TAKEN}


def completed_at(at: float) -> datetime:
    """A mark's completion time (seconds since the epoch) as the models store times: naive UTC."""
    return datetime.fromtimestamp(at, UTC).replace(tzinfo=None)
