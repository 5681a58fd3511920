"""The throttle's Redis scripts against a small reference model, driven by hypothesis.

The model below is what the throttle promises, in plain Python: limits, lines of waiters, holders with
leases, hand-offs. A state machine sends random sequences of the store's calls (new operations, steps
starting and ending, time passing, the reaper, limit changes) to both the real scripts on a real Redis
and the model, compares every answer, and after every call checks the Redis state against the model and
against the throttle's invariants. Time is a test clock passed as ``now_ms``; the server's clock is
never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import permutations
from uuid import uuid4

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from middleware.throttle import Handoff, ThrottleScope, ThrottleStore
from resources.redis_client import get_redis

LEASE_MS = 10_000
HANDOFF_MS = 5_000
POOL = ("a", "b", "c")
HOLDS = ("granted", "holding")  # the states in which an operation has its slots
LIVE = ("waiting", *HOLDS, "lost")


def new_prefix() -> str:
    return f"{os.environ['JOBS_NAMESPACE']}:model:{uuid4().hex}"


def delete_keys(prefix: str) -> None:
    client = get_redis()
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


# -- the model -------------------------------------------------------------------------------------


@dataclass
class Op:
    scopes: tuple[str, ...]
    #: absent (not seen yet) | waiting | granted | holding | lost | done
    state: str = "absent"
    #: (delay ms, message) to send when it is granted; kept until its first step starts.
    messages: list[tuple[int, str]] = field(default_factory=list)
    #: Its place in line: smaller parked earlier.
    arrival: int = 0
    fence: int = 0
    #: When its lease runs out (granted or holding); None while its next step is queued (no expiry).
    expiry: int | None = None


class Model:
    """What the throttle should do, without Redis."""

    def __init__(self) -> None:
        self.limits: dict[str, int] = {}
        self.ops: dict[str, Op] = {}
        self.grants = 0  # every grant takes the next fence
        self.arrivals = 0

    # -- looking ---------------------------------------------------------------------------------
    def holders(self, scope: str) -> set[str]:
        return {op for op, o in self.ops.items() if o.state in HOLDS and scope in o.scopes}

    def waiters(self, scope: str) -> list[str]:
        line = [(o.arrival, op) for op, o in self.ops.items() if o.state == "waiting" and scope in o.scopes]
        return [op for _arrival, op in sorted(line)]

    def has_room(self, scope: str) -> bool:
        return len(self.holders(scope)) < self.limits[scope]

    def first_everywhere_with_room(self, op: str) -> bool:
        return all(self.waiters(s)[:1] == [op] and self.has_room(s) for s in self.ops[op].scopes)

    # -- changing --------------------------------------------------------------------------------
    def grant(self, op: str, state: str, now: int) -> None:
        o = self.ops[op]
        self.grants += 1
        o.state, o.fence = state, self.grants
        if state == "holding":
            o.expiry = now + LEASE_MS
        else:  # a hand-off: its first step must start before the latest message is due, plus a margin
            o.expiry = now + max((d for d, _m in o.messages), default=0) + HANDOFF_MS

    def promote(self, now: int) -> dict[str, list[tuple[int, str]]]:
        """Grant every waiter that is first in line in all its scopes, each with room; until none is.
        Returns the granted operations with their parked messages (the order of grants is free)."""
        handed = {}
        while ready := [
            op for op, o in self.ops.items() if o.state == "waiting" and self.first_everywhere_with_room(op)
        ]:
            op = min(ready, key=lambda op: self.ops[op].arrival)
            self.grant(op, "granted", now)
            handed[op] = list(self.ops[op].messages)
        return handed

    def acquire(
        self, op: str, limits: dict[str, int], *, start: bool, messages: list, current: bool, now: int
    ) -> tuple[str, int, dict]:
        for scope, limit in limits.items():
            if current or scope not in self.limits:
                self.limits[scope] = limit
        o = self.ops.setdefault(op, Op(scopes=tuple(limits)))
        if o.state == "waiting":  # parked first: if a raised limit admits it now, these go with it
            o.messages += messages
            return "parked", 0, self.promote(now)
        handoffs = self.promote(now)  # a raised limit serves the line before anyone new
        if o.state == "done":
            return "done", 0, handoffs
        if o.state in HOLDS:
            if start:  # a step starts: the hand-off is over, the lease runs
                o.state, o.messages, o.expiry = "holding", [], now + LEASE_MS
            return "held", o.fence, handoffs
        # absent or lost: a newcomer, taking all its scopes if nobody waits in any and each has room
        o.scopes, o.messages, o.expiry = tuple(limits), list(messages), None
        if all(not self.waiters(s) and self.has_room(s) for s in o.scopes):
            if start:
                o.messages = []
            self.grant(op, "holding" if start else "granted", now)
            return "granted", o.fence, handoffs
        self.arrivals += 1
        o.state, o.arrival = "waiting", self.arrivals
        return "parked", 0, handoffs

    def release(self, op: str, now: int) -> dict:
        o = self.ops.setdefault(op, Op(scopes=()))
        if o.state == "done":
            return {}
        o.state, o.messages, o.expiry = "done", [], None
        return self.promote(now)

    def lease(self, ops: list[str], expiry: int | None) -> list[str]:
        """Renew (expiry in ms) or mark queued (None) the holding ones; return the others."""
        lost = []
        for op in ops:
            if op in self.ops and self.ops[op].state == "holding":
                self.ops[op].expiry = expiry
            else:
                lost.append(op)
        return lost

    def reap(self, now: int) -> tuple[dict, dict]:
        redrives = {}
        for op, o in self.ops.items():
            if o.state in HOLDS and o.expiry is not None and o.expiry <= now:
                if o.state == "granted" and o.messages:  # its first step never started: send it again
                    o.expiry = now + max((d for d, _m in o.messages), default=0) + HANDOFF_MS
                    redrives[op] = list(o.messages)
                else:  # its worker stopped renewing (or it has nothing to send): it loses its slots
                    o.state, o.expiry = "lost", None
        return redrives, self.promote(now)

    def set_limit(self, scope: str, limit: int, now: int) -> dict:
        self.limits[scope] = limit
        return self.promote(now)


# -- the state machine -----------------------------------------------------------------------------

#: Operations arriving together, each as a producer's submit (start=False) or a worker's step (start=True).
ARRIVALS = st.lists(
    st.fixed_dictionaries(
        {
            "scopes": st.sampled_from([(s,) for s in POOL] + list(permutations(POOL, 2))),  # one or two, any order
            "start": st.booleans(),
            "delays": st.lists(st.sampled_from([0, 250, 3_000]), max_size=2),
            "stated": st.sampled_from([None, None, None, 1, 2, 3, 4]),  # None: the configured limit
            "current": st.booleans(),  # limits_are_current
        }
    ),
    min_size=1,
    max_size=3,
)


class ThrottleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.prefix = new_prefix()
        self.store = ThrottleStore(get_redis(), self.prefix, lease_ms=LEASE_MS, handoff_timeout_ms=HANDOFF_MS)
        self.model = Model()
        self.now = 1_000_000
        self.configured: dict[str, int] = {}  # the limits producers are configured with
        self.fence = 0  # the last fence seen
        self.counter = 0  # for unique operation ids and messages
        self.previous_holders: dict[str, set[str]] = {s: set() for s in POOL}
        self.previous_waiters: dict[str, list[str]] = {s: [] for s in POOL}

    def teardown(self) -> None:
        delete_keys(self.prefix)

    def next_id(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}{self.counter}"

    def next_expiry(self) -> int | None:
        return min((o.expiry for o in self.model.ops.values() if o.expiry and o.expiry > self.now), default=None)

    def ops_in(self, *states: str) -> list[str]:
        return sorted(op for op, o in self.model.ops.items() if o.state in states)

    # -- checking answers --------------------------------------------------------------------------
    def check_new_fences(self, fences: list[int]) -> None:
        # every grant takes the next number of one counter: fresh and strictly increasing
        assert fences == list(range(self.fence + 1, self.fence + 1 + len(fences))), (fences, self.fence)
        self.fence += len(fences)

    def check_handoffs(self, got: list[Handoff], expected: dict[str, list]) -> None:
        # Then exactly the expected operations are granted, once each, with exactly their parked messages
        assert len(got) == len({h.operation_id for h in got}), got
        assert {h.operation_id: h.messages for h in got} == expected
        self.check_new_fences([h.fence for h in got])
        for h in got:  # the order of one call's grants is free; the model takes it from the answer
            self.model.ops[h.operation_id].fence = h.fence

    def acquire(
        self, op: str, scopes: tuple[str, ...], *, start: bool, messages: list, stated: int | None, current: bool
    ) -> None:
        limits = {s: stated or self.configured[s] for s in scopes}
        got = self.store.acquire(
            op,
            [ThrottleScope(s, limit) for s, limit in limits.items()],
            start=start,
            messages=messages,
            limits_are_current=current,
            now_ms=self.now,
        )
        status, _fence, handoffs = self.model.acquire(
            op, limits, start=start, messages=messages, current=current, now=self.now
        )
        self.check_handoffs(got.handoffs, handoffs)
        assert got.status == status, (op, got, status)
        if status == "granted":
            self.check_new_fences([got.fence])
        assert got.fence == (self.model.ops[op].fence if status in ("granted", "held") else 0)

    # -- rules -----------------------------------------------------------------------------------
    @initialize(limits=st.tuples(*[st.integers(1, 3)] * len(POOL)), arrivals=ARRIVALS)
    def scopes_with_limits_and_first_operations(self, limits: tuple[int, ...], arrivals: list[dict]) -> None:
        self.configured = dict(zip(POOL, limits, strict=True))
        self.operations_arrive(arrivals)

    def pick(self, data: st.DataObject, *states: str, likely: list[str] | None = None) -> str:
        """Mostly an operation in one of ``states`` (or of ``likely``) if any; sometimes any known one."""
        likely = self.ops_in(*states) if likely is None else likely
        anyone = st.sampled_from(sorted(self.model.ops))
        return data.draw(st.one_of(*[st.sampled_from(likely)] * 3, anyone) if likely else anyone)

    @rule(arrivals=ARRIVALS)
    def operations_arrive(self, arrivals: list[dict]) -> None:
        for n, arrival in enumerate(arrivals):
            if n:  # the invariants hold after every call, not only after every rule
                self.redis_agrees_with_the_model_and_the_invariants_hold()
            op = self.next_id("op")
            messages = [(delay, self.next_id(f"{op}|m")) for delay in arrival["delays"]]  # "|": the separator
            scopes = arrival["scopes"]
            self.acquire(
                op,
                scopes,
                start=arrival["start"],
                messages=messages,
                stated=arrival["stated"],
                current=arrival["current"],
            )

    @rule()
    def an_unknown_operation_is_released(self) -> None:
        op = self.next_id("stranger")
        self.check_handoffs(self.store.release(op, now_ms=self.now), self.model.release(op, self.now))

    @rule(data=st.data())
    def a_step_starts(self, data: st.DataObject) -> None:
        # a worker about to run a step re-acquires with the limits stamped on its (old) message
        op = self.pick(data, "granted", "lost")
        scopes = self.model.ops[op].scopes or (POOL[0],)  # a stranger's straggling step
        step = [(0, self.next_id(f"{op}|step"))]
        self.acquire(op, scopes, start=True, messages=step, stated=None, current=False)

    @rule(data=st.data(), delays=st.lists(st.sampled_from([0, 250, 3_000]), max_size=2))
    def the_producer_submits_again(self, data: st.DataObject, delays: list[int]) -> None:
        # a producer retrying its submit (say, after a crash) with the same operation id
        op = self.pick(data, *LIVE)
        scopes = self.model.ops[op].scopes or (POOL[0],)
        messages = [(delay, self.next_id(f"{op}|again")) for delay in delays]
        self.acquire(op, scopes, start=False, messages=messages, stated=None, current=True)

    @rule(data=st.data())
    def a_step_ends_and_the_next_is_queued(self, data: st.DataObject) -> None:
        op = self.pick(data, "holding")
        assert self.store.mark_queued([op], now_ms=self.now) == self.model.lease([op], None)

    @rule(data=st.data())
    def the_heartbeat_renews_leases(self, data: st.DataObject) -> None:
        ops = [self.pick(data, "holding"), self.pick(data, "holding")]
        assert self.store.renew(ops, now_ms=self.now) == self.model.lease(ops, self.now + LEASE_MS)

    @rule(data=st.data())
    def the_operation_ends(self, data: st.DataObject) -> None:
        # (sometimes of a lost one, or a second release of a done one, which does nothing)
        op = self.pick(data, *HOLDS)
        self.check_handoffs(self.store.release(op, now_ms=self.now), self.model.release(op, self.now))

    @rule(data=st.data())
    def a_waiting_operation_is_cancelled(self, data: st.DataObject) -> None:
        # a release while waiting, mostly of the first in a line: it may let those behind it through
        op = self.pick(data, likely=sorted({line[0] for s in POOL if (line := self.model.waiters(s))}))
        self.check_handoffs(self.store.release(op, now_ms=self.now), self.model.release(op, self.now))

    @rule(ms=st.one_of(st.integers(0, 15_000), st.sampled_from([HANDOFF_MS - 1, HANDOFF_MS, LEASE_MS - 1, LEASE_MS])))
    def time_passes(self, ms: int) -> None:
        self.now += ms

    @rule()
    def time_reaches_the_next_lease_expiry(self) -> None:
        # to the very millisecond: a lease has expired when its expiry is <= now
        self.now = self.next_expiry() or self.now

    @rule()
    def the_reaper_runs(self) -> None:
        redrives, handoffs = self.store.reap(now_ms=self.now)
        expected_redrives, expected_handoffs = self.model.reap(self.now)
        # hand-offs whose first step never started are sent again, with their messages and fences
        assert len(redrives) == len({h.operation_id for h in redrives})
        assert {h.operation_id: (h.fence, h.messages) for h in redrives} == {
            op: (self.model.ops[op].fence, messages) for op, messages in expected_redrives.items()
        }
        self.check_handoffs(handoffs, expected_handoffs)

    @rule(scope=st.sampled_from(POOL), limit=st.integers(1, 4))
    def a_limit_changes(self, scope: str, limit: int) -> None:
        self.configured[scope] = limit
        got = self.store.set_limit(ThrottleScope(scope, limit), now_ms=self.now)
        self.check_handoffs(got, self.model.set_limit(scope, limit, self.now))

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def redis_agrees_with_the_model_and_the_invariants_hold(self) -> None:
        views = {s: self.store.explain(s) for s in POOL}
        holders = {s: {h.operation_id for h in v.holders} for s, v in views.items()}
        waiters = {s: [w.operation_id for w in v.waiters] for s, v in views.items()}
        pipe = self.store.client.pipeline(transaction=False)
        for op in self.model.ops:
            pipe.hget(f"{self.prefix}:op:{op}", "state")
            pipe.lrange(f"{self.prefix}:msgs:{op}", 0, -1)
        answers = pipe.execute()
        states = dict(zip(self.model.ops, answers[::2], strict=True))
        kept = dict(zip(self.model.ops, answers[1::2], strict=True))

        for s, view in views.items():
            # the model and Redis agree on the scope: limit, holders (with their leases), line in order
            assert view.limit == self.model.limits.get(s)
            assert {h.operation_id: (h.state, h.fence, h.lease_expires_ms) for h in view.holders} == {
                op: (o.state, o.fence, o.expiry) for op, o in self.model.ops.items() if op in self.model.holders(s)
            }
            assert waiters[s] == self.model.waiters(s)
            assert view.waiting == len(waiters[s])

            # 1. at most `limit` hold the scope. A lowered limit interrupts nobody, but while the scope is
            # over it nobody new may come in: every holder must already have held it before this call.
            if view.limit is not None and len(holders[s]) > view.limit:
                assert holders[s] <= self.previous_holders[s], f"{s}: granted while over its limit"

            # 2. FIFO: of those in line before, the granted ones were the first; nobody jumped the line
            line = [op for op in self.previous_waiters[s] if states[op] != "done"]  # cancelled ones left
            granted = [op for op in line if op in holders[s]]
            assert granted == line[: len(granted)], f"{s}: granted out of order"
            if any(op in waiters[s] for op in line):
                assert holders[s] - self.previous_holders[s] <= set(line), f"{s}: a newcomer jumped the line"

            # 6. nobody waits who could be granted: the head needs a full scope or one where it is not first
            if waiters[s]:
                head = waiters[s][0]
                assert any(
                    len(holders[t]) >= views[t].limit or waiters[t][:1] != [head] for t in self.model.ops[head].scopes
                ), f"{s}: {head} could be granted but waits"

        # 3. each operation is in exactly one state, and Redis keeps it where that state says
        for op, o in self.model.ops.items():
            assert states[op] == (None if o.state == "absent" else o.state), op
            # 5. messages are kept, in order, exactly while waiting or handed off (deleted once a step starts)
            assert kept[op] == [f"{delay}|{message}" for delay, message in o.messages], op
            holding_in = {s for s in POOL if op in holders[s]}
            waiting_in = {s for s in POOL if op in waiters[s]}
            if o.state == "waiting":
                assert (holding_in, waiting_in) == (set(), set(o.scopes)), op
            elif o.state in HOLDS:
                assert (holding_in, waiting_in) == (set(o.scopes), set()), op
            else:
                assert (holding_in, waiting_in) == (set(), set()), op
        assert set().union(*holders.values(), *map(set, waiters.values())) <= set(self.model.ops)

        self.previous_holders, self.previous_waiters = holders, waiters


ThrottleMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestThrottleModel = ThrottleMachine.TestCase


# -- examples the machine is unlikely to stumble on -----------------------------------------------


@pytest.fixture
def store():
    prefix = new_prefix()
    yield ThrottleStore(get_redis(), prefix, lease_ms=LEASE_MS, handoff_timeout_ms=HANDOFF_MS)
    delete_keys(prefix)


def test_a_ring_of_operations_over_three_scopes_cannot_deadlock(store):
    # Given three scopes at limit 1, each held, and three operations each wanting two of them in a ring
    a, b, c = (ThrottleScope(key, 1) for key in "abc")
    for key, scope in zip("abc", (a, b, c), strict=True):
        store.acquire(f"holder-{key}", [scope], start=True, now_ms=1000)
    wants = {"ab": [a, b], "bc": [b, c], "ca": [c, a]}
    for op, scopes in wants.items():
        assert store.acquire(op, scopes, start=False, messages=[(0, op)], now_ms=1001).status == "parked"

    # When the holders end, and each granted operation ends in turn
    finished = []
    pending = [h for key in "abc" for h in store.release(f"holder-{key}", now_ms=1002)]
    while pending:
        handoff = pending.pop(0)
        op = handoff.operation_id
        assert store.acquire(op, wants[op], start=True, now_ms=1003).status == "held"
        finished.append(op)
        pending += store.release(op, now_ms=1004)

    # Then all three ran, in arrival order, and nothing is left behind
    assert finished == ["ab", "bc", "ca"]
    for key in "abc":
        view = store.explain(key)
        assert (view.holders, view.waiters) == ([], [])


def test_a_blocked_head_of_the_line_holds_back_those_behind_it(store):
    # Given b full, and an operation waiting for a and b at the head of a's line
    a, b = ThrottleScope("a", 2), ThrottleScope("b", 1)
    store.acquire("holder-b", [b], start=True, now_ms=1000)
    assert store.acquire("ab", [a, b], start=False, now_ms=1001).status == "parked"

    # When an operation needing only a (which has room) arrives
    admission = store.acquire("a-only", [a], start=False, now_ms=1002)

    # Then it queues behind the head rather than overtake it; both go once b is free
    assert admission.status == "parked"
    assert [h.operation_id for h in store.release("holder-b", now_ms=1003)] == ["ab", "a-only"]


def test_cancelling_a_blocked_head_of_the_line_lets_the_next_through(store):
    # Given a's line headed by an operation that also needs b (full), and behind it one needing only a
    a, b = ThrottleScope("a", 1), ThrottleScope("b", 1)
    store.acquire("holder-b", [b], start=True, now_ms=1000)
    store.acquire("ab", [a, b], start=False, messages=[(0, "ab")], now_ms=1001)
    store.acquire("a-only", [a], start=False, messages=[(0, "a-only")], now_ms=1002)

    # When the head is cancelled
    handoffs = store.release("ab", now_ms=1003)

    # Then the next in line takes a at once, with its messages
    assert [(h.operation_id, h.messages) for h in handoffs] == [("a-only", [(0, "a-only")])]
    assert [h.operation_id for h in store.explain("a").holders] == ["a-only"]


def test_one_reap_hands_on_every_scope_it_frees(store):
    # Given two running operations in different scopes, each with a waiter behind it
    a, b = ThrottleScope("a", 1), ThrottleScope("b", 1)
    store.acquire("running-a", [a], start=True, now_ms=1000)
    store.acquire("running-b", [b], start=True, now_ms=1000)
    store.acquire("next-a", [a], start=False, messages=[(0, "next-a")], now_ms=1001)
    store.acquire("next-b", [b], start=False, messages=[(0, "next-b")], now_ms=1001)

    # When both their workers stop renewing, and the reaper runs when the leases are out
    redrives, handoffs = store.reap(now_ms=1000 + LEASE_MS)

    # Then both lose their slots, and both waiters are handed theirs
    assert redrives == []
    assert sorted(h.operation_id for h in handoffs) == ["next-a", "next-b"]
    assert store.state_of("running-a") == store.state_of("running-b") == "lost"
