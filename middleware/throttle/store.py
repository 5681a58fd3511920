"""The throttle's state in Redis, behind a small typed API over its Lua scripts.

Every change is one script, so each is atomic: admission, release with hand-off, lease renewal, reaping.
The scripts read the server's clock; tests pass ``now_ms`` instead. Scripts are loaded once per process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources as package_files
from typing import Any, Literal, Protocol
from uuid import uuid4

import redis
from redis.commands.core import Script

from resources.redis_client import ScriptCall, ThreadConnections, pipelined, run_script
from resources.replies_later import Replies

from .scopes import ThrottleScope

__all__ = ["Admission", "Explanation", "Guard", "GuardedCall", "Handoff", "Holder", "ThrottleStore", "Waiter"]

Status = Literal["granted", "held", "parked", "done", "guarded"]


@dataclass(frozen=True)
class Handoff:
    """An operation that was just given its slots: send ``messages`` (delay ms, encoded message)."""

    operation_id: str
    fence: int
    messages: list[tuple[int, str]]


@dataclass(frozen=True)
class Admission:
    status: Status
    #: The grant number: it grows with every grant, so a step can tell whether its operation was
    #: re-admitted since (0 when not holding).
    fence: int
    #: Waiters admitted as a side effect (a raised limit); the caller sends their messages.
    handoffs: list[Handoff] = field(default_factory=list)
    #: With status "guarded": the value of the guard key that someone else had set (see ``acquire``).
    guarded_by: str | None = None
    #: Whether ``acquire``'s ``then`` calls ran: the operation was granted and its first steps were sent.
    sent: bool = False


class GuardedCall(Protocol):
    """A script call prepared to run right after an admission, in its round trip, and only if it grants (the
    broker's store of a first step: ``jobs.redis_broker.DeferredEnqueue``)."""

    @property
    def script(self) -> Script: ...

    @property
    def keys(self) -> list[str]: ...

    def guarded_args(self, guard_key: str) -> list[Any]:
        """Its arguments, such that it does nothing unless ``guard_key`` exists when it runs."""
        ...

    def run(self) -> None:
        """Make the call now, unguarded."""
        ...


@dataclass(frozen=True)
class Guard:
    """A key ``acquire`` sets (if not set) before it admits: whoever sets it first goes on."""

    key: str
    value: str
    ttl_ms: int


@dataclass(frozen=True)
class Holder:
    operation_id: str
    state: str
    fence: int
    since_ms: int
    #: None while the operation's next step waits in the broker (no expiry then).
    lease_expires_ms: int | None


@dataclass(frozen=True)
class Waiter:
    operation_id: str
    position: int
    waiting_since_ms: int


@dataclass(frozen=True)
class Explanation:
    scope: str
    limit: int | None
    holders: list[Holder]
    waiters: list[Waiter]
    #: All waiters, even when ``waiters`` shows only the first few.
    waiting: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "limit": self.limit,
            "holders": [vars(h) for h in self.holders],
            "waiters": [vars(w) for w in self.waiters],
            "waiting": self.waiting,
        }


@cache
def _script_source(name: str) -> str:
    folder = package_files.files(__package__).joinpath("lua")
    return folder.joinpath("common.lua").read_text() + "\n" + folder.joinpath(f"{name}.lua").read_text()


def _expiry(score: float) -> int | None:
    return None if score == float("inf") else int(score)


def _list(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


def _handoffs(raw: Any) -> list[Handoff]:
    result = []
    for op, fence, messages in _list(raw):
        parsed = []
        for item in _list(messages):
            delay, _, encoded = item.partition("|")
            parsed.append((int(delay), encoded))
        result.append(Handoff(op, int(fence), parsed))
    return result


def _admission(reply: list[Any]) -> Admission:
    status, fence, handoffs, *guarded_by = reply
    return Admission(status, int(fence), _handoffs(handoffs), guarded_by[0] if guarded_by else None)


class ThrottleStore:
    """Scopes, holders and waiters under ``prefix`` in one Redis database."""

    def __init__(self, client: redis.Redis, prefix: str, *, lease_ms: int, handoff_timeout_ms: int) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ms = lease_ms
        self.handoff_timeout_ms = handoff_timeout_ms
        self._scripts = {
            name: client.register_script(_script_source(name))
            for name in ("acquire", "release", "lease", "reap", "set_limit")
        }

    def _args(self, now_ms: int | None, *args: Any) -> list[Any]:
        """A script's arguments: every script takes the prefix and the clock ("": the server's) first."""
        return [self.prefix, "" if now_ms is None else str(now_ms), *args]

    def _run(self, name: str, now_ms: int | None, *args: Any) -> Any:
        return json.loads(run_script(self.client, self._scripts[name], args=self._args(now_ms, *args)))

    # -- the operation's life --------------------------------------------------------------------
    def acquire(
        self,
        operation_id: str,
        scopes: list[ThrottleScope],
        *,
        start: bool,
        messages: list[tuple[int, str]] = (),  # type: ignore[assignment]
        limits_are_current: bool = True,
        now_ms: int | None = None,
        guard: Guard | None = None,
        then: Sequence[GuardedCall] = (),
    ) -> Admission:
        """Admit the operation or park it (with ``messages``, sent when it is granted).

        ``start=True``: a worker is about to run one of its steps; a grant holds at once. Otherwise the
        producer is about to send the first steps itself: the grant is reserved until one starts, and
        ``messages`` are kept so a send lost in a crash can be re-driven. ``limits_are_current=False``
        (a worker re-acquiring with limits stamped on an old message) keeps the stored limits. With ``guard``,
        its key is set first, in the same script; when someone else had set it, nothing else happens and the
        admission is "guarded", with that key's value.

        ``then`` (with ``start=False``): calls to make in the same round trip, which take effect only if the
        operation is granted (the send of its first steps); the admission says ``sent`` when they did.
        """
        args = self._acquire_args(
            now_ms,
            operation_id,
            scopes,
            start=start,
            messages=messages,
            limits_are_current=limits_are_current,
            guard=guard,
        )
        if then and not start:
            return self._acquire_then(args, then)
        return _admission(json.loads(run_script(self.client, self._scripts["acquire"], args=args)))

    def _acquire_args(
        self,
        now_ms: int | None,
        operation_id: str,
        scopes: list[ThrottleScope],
        *,
        start: bool,
        messages: Sequence[tuple[int, str]],
        limits_are_current: bool,
        guard: Guard | None,
    ) -> list[Any]:
        guard_args = ["", "", ""] if guard is None else [guard.key, guard.value, guard.ttl_ms]
        return self._args(
            now_ms,
            operation_id,
            "start" if start else "submit",
            self.lease_ms,
            self.handoff_timeout_ms,
            json.dumps([[s.key, s.limit] for s in scopes]),
            "set" if limits_are_current else "keep",
            json.dumps([[int(d), m] for d, m in messages]),
            *guard_args,
        )

    def _acquire_then(self, args: list[Any], then: Sequence[GuardedCall]) -> Admission:
        """The admission and the ``then`` calls in one round trip: a grant sets a key of its own, which each call
        checks, and which goes at the end of the round trip. One round trip instead of two for every throttled
        operation's start."""
        for _attempt in range(2):
            admission = self._then_outcome(pipelined(self.client, self._then_commands(args, then)), then)
            if admission is not None:
                return admission
            # Not loaded on this server yet (a first call, a restart): nothing ran, so load it and go again.
            self.client.script_load(self._scripts["acquire"].script)
        raise redis.exceptions.NoScriptError(f"the throttle's acquire script is still not loaded on {self.client}")

    def acquire_ahead(
        self,
        operation_id: str,
        scopes: list[ThrottleScope],
        *,
        messages: list[tuple[int, str]],
        guard: Guard,
        then: Sequence[GuardedCall],
        answer: Callable[[Admission | Exception], None],
    ) -> None:
        """``acquire(start=False, messages=…, guard=…, then=…)`` without waiting for Redis to answer: ``answer``
        gets the admission, or the error that kept it from being made, once the reply is read (see
        ``ThreadConnections.send_ahead``). On a client that cannot send ahead, it is made at once."""
        args = self._acquire_args(
            None, operation_id, scopes, start=False, messages=messages, limits_are_current=True, guard=guard
        )
        if not isinstance(self.client, ThreadConnections):
            answer(self._acquire_then(args, then))
            return

        def read(replies: Replies) -> None:
            try:
                if isinstance(replies, Exception):
                    raise replies
                # None: the script was not loaded (a restart), so nothing ran; made again, waiting this time.
                admission = self._then_outcome(replies, then) or self._acquire_then(args, then)
            except Exception as error:
                answer(error)
                return
            answer(admission)

        self.client.send_ahead(self._then_commands(args, then), read)

    def _then_commands(self, args: list[Any], then: Sequence[GuardedCall]) -> list[tuple[Any, ...]]:
        granted_key = f"{self.prefix}:granting:{uuid4().hex}"
        # EVALSHA by hand, as in ``release``: a pipeline given script objects first asks whether they are loaded.
        return [
            ("EVALSHA", self._scripts["acquire"].sha, 0, *args, granted_key),
            *(
                ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.guarded_args(granted_key))
                for call in then
            ),
            ("DEL", granted_key),
        ]

    @staticmethod
    def _then_outcome(replies: list[Any], then: Sequence[GuardedCall]) -> Admission | None:
        """The admission the replies of ``_then_commands`` say; None when the acquire script was not loaded."""
        reply, *outcomes, _deleted = replies
        if isinstance(reply, redis.exceptions.NoScriptError):
            return None
        if isinstance(reply, Exception):
            raise reply
        admission = _admission(json.loads(reply))
        if admission.status != "granted":
            return admission
        for call, outcome in zip(then, outcomes, strict=True):
            if isinstance(outcome, redis.exceptions.NoScriptError):
                call.run()  # granted, so its guard would have let it through
            elif isinstance(outcome, Exception):
                raise outcome
        return dataclasses.replace(admission, sent=True)

    def release(
        self, operation_id: str, *, now_ms: int | None = None, delete_keys: Sequence[str] = ()
    ) -> list[Handoff]:
        """End the operation's hold (or wait) and hand its slots on. A second release is a no-op.
        ``delete_keys`` (the ended operation's other keys on this server) are deleted first, in the same round
        trip; best effort, as a failed delete of theirs changes nothing here."""
        if not delete_keys:
            _status, handoffs = self._run("release", now_ms, operation_id, self.handoff_timeout_ms)
            return _handoffs(handoffs)
        script = self._scripts["release"]
        args = self._args(now_ms, operation_id, self.handoff_timeout_ms)
        # EVALSHA by hand: a pipeline given the script object would first ask whether it is loaded, a round
        # trip of its own. A server that lost its scripts (a restart) gets it run the usual way.
        _deleted, reply = pipelined(self.client, [("DEL", *delete_keys), ("EVALSHA", script.sha, 0, *args)])
        if isinstance(reply, redis.exceptions.NoScriptError):
            reply = script(args=args)
        elif isinstance(reply, Exception):
            raise reply
        _status, handoffs = json.loads(reply)
        return _handoffs(handoffs)

    def renew(self, operation_ids: list[str], *, now_ms: int | None = None) -> list[str]:
        """Steps of these operations are running: extend their leases. Returns those that lost theirs."""
        if not operation_ids:
            return []
        return _list(self._run("lease", now_ms, "run", self.lease_ms, json.dumps(operation_ids)))

    def mark_queued(self, operation_ids: list[str], *, now_ms: int | None = None) -> list[str]:
        """Their next steps are in the broker (at-least-once): no expiry until one starts."""
        if not operation_ids:
            return []
        return _list(self._run("lease", now_ms, "queued", self.lease_ms, json.dumps(operation_ids)))

    def queued_call(self, operation_ids: list[str]) -> ScriptCall:
        """``mark_queued`` as a call to send with others in one round trip (``run_calls``); its reply is what
        ``mark_queued`` would return, as JSON."""
        args = self._args(None, "queued", self.lease_ms, json.dumps(operation_ids))
        return ScriptCall(self._scripts["lease"], (), args)

    def reap(self, *, batch: int = 100, now_ms: int | None = None) -> tuple[list[Handoff], list[Handoff]]:
        """Act on expired leases: returns (hand-offs to send again, new hand-offs of reclaimed slots)."""
        redrives, handoffs = self._run("reap", now_ms, self.handoff_timeout_ms, batch)
        return _handoffs(redrives), _handoffs(handoffs)

    def set_limit(self, scope: ThrottleScope, *, now_ms: int | None = None) -> list[Handoff]:
        return _handoffs(self._run("set_limit", now_ms, scope.key, scope.limit, self.handoff_timeout_ms))

    # -- looking -----------------------------------------------------------------------------------
    def explain(self, scope: str, *, max_waiters: int = 100) -> Explanation:
        """The scope's limit, holders (operation, since, lease expiry) and first waiters."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(f"{self.prefix}:limits", scope)
        pipe.zrange(f"{self.prefix}:holders:{scope}", 0, -1, withscores=True)
        pipe.zrange(f"{self.prefix}:waiters:{scope}", 0, max_waiters - 1)
        pipe.zcard(f"{self.prefix}:waiters:{scope}")
        limit, holders, waiters, waiting = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        for op, _expiry in holders:
            pipe.hmget(f"{self.prefix}:op:{op}", "state", "fence", "granted_at")
        for op in waiters:
            pipe.hget(f"{self.prefix}:op:{op}", "waiting_since")
        details = pipe.execute()
        holder_rows = [
            Holder(
                op, state or "?", int(fence or 0), int(granted or 0), None if expiry == float("inf") else int(expiry)
            )
            for (op, expiry), (state, fence, granted) in zip(holders, details[: len(holders)], strict=True)
        ]
        waiter_rows = [
            Waiter(op, position, int(since or 0))
            for position, (op, since) in enumerate(zip(waiters, details[len(holders) :], strict=True))
        ]
        return Explanation(scope, int(limit) if limit else None, holder_rows, waiter_rows, int(waiting))

    def scopes(self) -> list[str]:
        return sorted(self.client.smembers(f"{self.prefix}:scopes"))

    def occupancy(self) -> dict[str, tuple[int | None, int, int]]:
        """Every scope's (limit, holders, waiters), in two round trips whatever the number of scopes."""
        scopes = self.scopes()
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(f"{self.prefix}:limits")
        for scope in scopes:
            pipe.zcard(f"{self.prefix}:holders:{scope}")
            pipe.zcard(f"{self.prefix}:waiters:{scope}")
        limits, *counts = pipe.execute()
        return {
            scope: (int(limits[scope]) if scope in limits else None, counts[2 * i], counts[2 * i + 1])
            for i, scope in enumerate(scopes)
        }

    def handoff_latency_ms(self, operation_id: str) -> int | None:
        """From the operation's grant (a hand-off) to its first step's start, by the server's clock."""
        granted, started = self.client.hmget(f"{self.prefix}:op:{operation_id}", "granted_at", "started_at")
        return int(started) - int(granted) if granted and started else None

    def state_of(self, operation_id: str) -> str | None:
        return self.client.hget(f"{self.prefix}:op:{operation_id}", "state")

    def stats(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.client.hgetall(f"{self.prefix}:stats").items()}
