"""The throttle's Redis scripts, one behaviour at a time, on a real Redis with a test clock."""

from __future__ import annotations

import os
import uuid

import pytest

from middleware.throttle import Guard, ThrottleScope, ThrottleStore
from resources.errors import ConfigurationError
from resources.redis_client import get_redis

LEASE_MS = 10_000
HANDOFF_MS = 5_000
A = ThrottleScope("a", 1)
B = ThrottleScope("b", 1)


@pytest.fixture
def store():
    client = get_redis()
    prefix = f"{os.environ['JOBS_NAMESPACE']}:store-test:{uuid.uuid4().hex[:8]}"
    yield ThrottleStore(client, prefix, lease_ms=LEASE_MS, handoff_timeout_ms=HANDOFF_MS)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def holders(store, scope):
    return [h.operation_id for h in store.explain(scope).holders]


def waiters(store, scope):
    return [w.operation_id for w in store.explain(scope).waiters]


def test_admits_up_to_the_limit_then_parks_in_arrival_order(store):
    # Given a scope with limit 2
    scope = ThrottleScope("s", 2)

    # When four operations arrive
    statuses = [store.acquire(op, [scope], start=True, now_ms=1000).status for op in ("o1", "o2", "o3", "o4")]

    # Then two hold and two wait, in arrival order
    assert statuses == ["granted", "granted", "parked", "parked"]
    assert holders(store, "s") == ["o1", "o2"]
    assert waiters(store, "s") == ["o3", "o4"]


def test_release_hands_the_slot_to_the_first_waiter_with_its_parked_messages(store):
    # Given a holder and two waiters with parked first steps
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "o2-first"), (250, "o2-second")], now_ms=1001)
    store.acquire("o3", [A], start=False, messages=[(0, "o3-first")], now_ms=1002)

    # When the holder ends
    handoffs = store.release("o1", now_ms=2000)

    # Then the first waiter, and only it, is granted, with its messages to send
    assert [(h.operation_id, h.messages) for h in handoffs] == [("o2", [(0, "o2-first"), (250, "o2-second")])]
    assert holders(store, "a") == ["o2"]
    assert waiters(store, "a") == ["o3"]


def test_a_second_release_frees_nothing_else(store):
    # Given o1 released and o2 granted its slot
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "m")], now_ms=1000)
    store.acquire("o3", [A], start=False, messages=[(0, "m")], now_ms=1000)
    store.release("o1", now_ms=1100)

    # When o1 is released again (a duplicate delivery of its last step)
    handoffs = store.release("o1", now_ms=1200)

    # Then o2 keeps the slot and o3 still waits
    assert handoffs == []
    assert holders(store, "a") == ["o2"]
    assert waiters(store, "a") == ["o3"]


@pytest.mark.parametrize("scripts_lost", [False, True])
def test_a_release_deletes_the_operations_other_keys_in_the_same_call(store, scripts_lost):
    # Given a holder, a waiter, and two keys the holder's operation leaves elsewhere on the server
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "o2-first")], now_ms=1001)
    others = [f"{store.prefix}:elsewhere:1", f"{store.prefix}:elsewhere:2"]
    for key in others:
        store.client.set(key, "x")
    if scripts_lost:
        store.client.script_flush()  # a restarted server: the release script is run the usual way then

    # When the holder ends, with those keys to delete
    handoffs = store.release("o1", now_ms=2000, delete_keys=others)

    # Then the keys are gone and the release did what a plain one does
    assert store.client.exists(*others) == 0
    assert [h.operation_id for h in handoffs] == ["o2"]
    assert holders(store, "a") == ["o2"]


def test_an_admission_with_a_guard_sets_it_first_and_one_whose_guard_is_set_changes_nothing(store):
    # Given a guard key nobody holds
    guard = Guard(f"{store.prefix}:guard:row-1", "sent", 60_000)

    # When an operation is submitted with it, it is admitted as usual and the guard is set, with its expiry
    admitted = store.acquire("o1", [A], start=False, messages=[(0, "o1-first")], guard=guard, now_ms=1000)
    assert (admitted.status, admitted.guarded_by) == ("granted", None)
    assert store.client.get(guard.key) == "sent"
    assert 0 < store.client.pttl(guard.key) <= 60_000

    # Then a second submission with the same guard (another sender of the same row) is refused, says who holds
    # it, and neither parks the messages again nor queues anyone
    store.client.set(f"{store.prefix}:guard:row-2", "sending:someone")
    other = Guard(f"{store.prefix}:guard:row-2", "sent", 60_000)
    refused = store.acquire("o2", [A], start=False, messages=[(0, "o2-first")], guard=other, now_ms=1001)
    assert (refused.status, refused.guarded_by) == ("guarded", "sending:someone")
    assert store.state_of("o2") is None
    assert waiters(store, "a") == []
    again = store.acquire("o1", [A], start=False, messages=[(0, "o1-first")], guard=guard, now_ms=1002)
    assert (again.status, again.guarded_by) == ("guarded", "sent")
    assert store.client.llen(f"{store.prefix}:msgs:o1") == 1


def test_a_released_operation_cannot_take_a_slot_again(store):
    # Given a released operation
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.release("o1", now_ms=1100)

    # When a straggling step of it asks again
    admission = store.acquire("o1", [A], start=True, now_ms=1200)

    # Then it is told it is done, and holds nothing
    assert admission.status == "done"
    assert holders(store, "a") == []


def test_several_scopes_are_taken_all_or_none(store):
    # Given scope b held by someone else
    store.acquire("holder-b", [B], start=True, now_ms=1000)

    # When an operation needs a and b
    admission = store.acquire("both", [A, B], start=True, now_ms=1001)

    # Then it takes neither, and waits in both lines
    assert admission.status == "parked"
    assert holders(store, "a") == []
    assert waiters(store, "a") == waiters(store, "b") == ["both"]

    # When b is released, it takes both at once
    handoffs = store.release("holder-b", now_ms=1002)
    assert [h.operation_id for h in handoffs] == ["both"]
    assert holders(store, "a") == holders(store, "b") == ["both"]


def test_opposite_orders_of_the_same_scopes_cannot_deadlock(store):
    # Given two operations asking for the same two scopes in opposite orders, and a third holding a
    store.acquire("first", [A], start=True, now_ms=1000)
    store.acquire("ab", [A, B], start=False, messages=[(0, "ab")], now_ms=1001)
    store.acquire("ba", [B, A], start=False, messages=[(0, "ba")], now_ms=1002)

    # When each ends in turn, the next is granted both scopes
    assert [h.operation_id for h in store.release("first", now_ms=1003)] == ["ab"]
    assert [h.operation_id for h in store.release("ab", now_ms=1004)] == ["ba"]
    assert holders(store, "a") == holders(store, "b") == ["ba"]


def test_raising_a_limit_admits_waiters_at_once_and_lowering_interrupts_nobody(store):
    # Given a scope at limit 1 with one holder and two waiters
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "m2")], now_ms=1000)
    store.acquire("o3", [A], start=False, messages=[(0, "m3")], now_ms=1000)

    # When the limit is raised to 3, both waiters are granted
    assert [h.operation_id for h in store.set_limit(ThrottleScope("a", 3), now_ms=1001)] == ["o2", "o3"]

    # When it is lowered to 1, all three keep their slots, and a newcomer waits until all three ended
    assert store.set_limit(ThrottleScope("a", 1), now_ms=1002) == []
    assert sorted(holders(store, "a")) == ["o1", "o2", "o3"]
    assert store.acquire("o4", [A], start=True, now_ms=1003).status == "parked"
    assert store.release("o1", now_ms=1004) == []
    assert store.release("o2", now_ms=1005) == []
    assert [h.operation_id for h in store.release("o3", now_ms=1006)] == ["o4"]


def test_an_expired_running_lease_is_reclaimed_and_handed_on(store):
    # Given o1 running a step (lease renewed by its worker) and o2 waiting
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "m2")], now_ms=1000)

    # When the lease is not renewed (its worker died) and the reaper runs after it expired
    assert store.reap(now_ms=1000 + LEASE_MS - 1) == ([], [])
    redrives, handoffs = store.reap(now_ms=1000 + LEASE_MS)

    # Then o1 lost its slot and o2 got it
    assert redrives == []
    assert [h.operation_id for h in handoffs] == ["o2"]
    assert store.state_of("o1") == "lost"

    # And o1's redelivered step must queue again
    assert store.acquire("o1", [A], start=True, now_ms=20_000).status == "parked"


def test_a_renewed_lease_is_not_reclaimed(store):
    store.acquire("o1", [A], start=True, now_ms=1000)
    assert store.renew(["o1"], now_ms=9000) == []
    assert store.reap(now_ms=1000 + LEASE_MS + 1) == ([], [])
    assert holders(store, "a") == ["o1"]


def test_between_steps_an_operation_keeps_its_slot_however_long_its_next_step_waits(store):
    # Given o1's step ended and its next step waits in the broker
    store.acquire("o1", [A], start=True, now_ms=1000)
    assert store.mark_queued(["o1"], now_ms=1100) == []

    # When a long time passes
    assert store.reap(now_ms=1000 + 100 * LEASE_MS) == ([], [])

    # Then it still holds (the broker redelivers its message); its next step finds it holding
    assert store.acquire("o1", [A], start=True, now_ms=1000 + 100 * LEASE_MS).status == "held"


def test_a_hand_off_whose_message_was_lost_is_sent_again(store):
    # Given o2 granted by a hand-off whose sender crashed before sending o2's first step
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "o2-first")], now_ms=1000)
    store.release("o1", now_ms=2000)

    # When its first step has not started by the hand-off timeout
    redrives, handoffs = store.reap(now_ms=2000 + HANDOFF_MS)

    # Then its message is returned to send again, and it keeps the slot
    assert [(h.operation_id, h.messages) for h in redrives] == [("o2", [(0, "o2-first")])]
    assert handoffs == []
    assert holders(store, "a") == ["o2"]

    # And once it starts, the parked copy is gone: nothing more to re-send
    assert store.acquire("o2", [A], start=True, now_ms=8000).status == "held"
    store.mark_queued(["o2"], now_ms=8001)
    assert store.reap(now_ms=100_000) == ([], [])


def test_cancelling_a_waiter_removes_it_from_the_line(store):
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "m2")], now_ms=1000)
    store.acquire("o3", [A], start=False, messages=[(0, "m3")], now_ms=1000)
    store.release("o2", now_ms=1001)
    assert waiters(store, "a") == ["o3"]
    assert [h.operation_id for h in store.release("o1", now_ms=1002)] == ["o3"]


def test_grant_numbers_grow_with_every_grant(store):
    first = store.acquire("o1", [A], start=True, now_ms=1000).fence
    store.acquire("o2", [A], start=False, messages=[(0, "m")], now_ms=1000)
    (handoff,) = store.release("o1", now_ms=1001)
    assert handoff.fence > first


def test_explain_shows_limit_holders_and_waiters(store):
    store.acquire("o1", [A], start=True, now_ms=1000)
    store.acquire("o2", [A], start=False, messages=[(0, "m")], now_ms=1500)
    explanation = store.explain("a").as_dict()
    assert explanation["limit"] == 1
    assert explanation["holders"] == [
        {"operation_id": "o1", "state": "holding", "fence": 1, "since_ms": 1000, "lease_expires_ms": 1000 + LEASE_MS}
    ]
    assert explanation["waiters"] == [{"operation_id": "o2", "position": 0, "waiting_since_ms": 1500}]
    assert explanation["waiting"] == 1


@pytest.mark.parametrize("limit", [0, -1, 1.5, "4", True, None])
def test_a_limit_must_be_a_positive_integer(limit):
    with pytest.raises(ConfigurationError, match="positive integer"):
        ThrottleScope("a", limit)


def test_a_scope_key_must_be_printable():
    with pytest.raises(ConfigurationError, match="scope key"):
        ThrottleScope("has space", 1)
