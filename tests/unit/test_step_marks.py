"""Step marks in Redis: a chained step's record, refused once its operation's chains were stopped."""

from __future__ import annotations

import uuid

import redis

from middleware.step_marks import MARKS_TTL_S, StepMarks
from resources.redis_client import ThreadConnections, get_redis


def test_marked_steps_are_read_back_with_their_completion_times() -> None:
    # Given an operation with two steps marked, one after the other
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0")
    assert marks.record(operation_id, "1")

    # When its marks are read
    marked = marks.paths(operation_id)

    # Then both are there, in the order they completed, and the marks expire by themselves after a week
    assert set(marked) == {"0", "1"}
    assert marked["0"] <= marked["1"]
    assert 0 < get_redis().ttl(marks._key(operation_id)) <= MARKS_TTL_S


def test_once_its_chains_are_stopped_an_operation_takes_no_more_marks() -> None:
    # Given an operation with a marked step, whose chains are then stopped (it is being ended)
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0")
    marks.stop_chains(operation_id)

    # When a chain tries to mark its next step
    accepted = marks.record(operation_id, "1")

    # Then the mark is refused (the chain records the step in the database instead, and stops), and the
    # marks made before are kept for the operation's end to write down
    assert accepted is False
    assert set(marks.paths(operation_id)) == {"0"}


def test_forgetting_an_operations_marks_keeps_its_chains_stopped() -> None:
    # Given an ended operation's marks, its chains stopped
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0")
    marks.stop_chains(operation_id)

    # When its marks are forgotten
    marks.forget(operation_id)

    # Then they are gone, and a chain still in the middle of a long step cannot mark one again
    assert marks.paths(operation_id) == {}
    assert marks.record(operation_id, "1") is False


def test_a_step_marked_already_is_refused() -> None:
    # Given a step that one copy of it marked done (two copies of it ran side by side)
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0")
    first = marks.paths(operation_id)["0"]

    # When the other copy finishes and marks it too
    accepted = marks.record(operation_id, "0")

    # Then it is refused, so only the first goes on to the next step, and the first's completion time stays
    assert accepted is False
    assert marks.paths(operation_id) == {"0": first}


def test_the_same_marker_marking_again_is_accepted() -> None:
    # Given a step marked by one completion, whose call is then retried (its reply was lost, or what came
    # after it failed for a moment)
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0", marker="first-copy")

    # When that completion marks it again, and another copy's completion tries too
    again = marks.record(operation_id, "0", marker="first-copy")
    other = marks.record(operation_id, "0", marker="second-copy")

    # Then the retry goes on, and the other copy is refused
    assert again is True
    assert other is False


def test_a_mark_made_with_an_alive_key_is_refused_once_that_key_is_gone() -> None:
    # Given an operation whose in-flight set (the key that lives as long as it runs) is there, then dropped
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    alive = f"test-alive:{operation_id}"
    get_redis().sadd(alive, "a copy")
    try:
        assert marks.record(operation_id, "0", alive_key=alive)
    finally:
        get_redis().delete(alive)

    # When a step of it is marked once the key is gone (the operation ended and its keys were dropped)
    accepted = marks.record(operation_id, "1", alive_key=alive)

    # Then that mark is refused and nothing is marked for it
    assert accepted is False
    assert set(marks.paths(operation_id)) == {"0"}
    marks.forget(operation_id)


def test_a_step_taken_for_a_database_record_refuses_other_marks_and_is_no_mark_itself() -> None:
    # Given an operation with one step marked
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0")

    # When the next step is taken (its completion is recorded in the database next), twice by one completion (a
    # retry) and once by another copy; and another copy then tries to mark it
    took, marked = marks.take(operation_id, "1", "first")
    again, _ = marks.take(operation_id, "1", "first")
    other, seen_by_other = marks.take(operation_id, "1", "second")
    chained = marks.record(operation_id, "1", "third")

    # Then the first completion took it (again on its retry) and the others were refused; every read, its own too,
    # has the marked step only: a take is not a record for any other step's record to write down
    assert (took, again, other, chained) == (True, True, False, False)
    assert set(marked) == set(seen_by_other) == set(marks.paths(operation_id)) == {"0"}
    marks.forget(operation_id)


def test_a_step_marked_already_cannot_be_taken() -> None:
    # Given a step one copy marked (its successor runs next)
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0", "chained")

    # When another copy, whose successor is sent, takes it
    took, marked = marks.take(operation_id, "0", "sent")

    # Then it is refused, and reads the mark that makes its completion a duplicate
    assert took is False
    assert set(marked) == {"0"}
    marks.forget(operation_id)


def test_marks_are_read_in_a_round_trip_of_the_projects_client_or_on_any_other(monkeypatch) -> None:
    # Given an operation with a marked step
    marks, operation_id = StepMarks(), uuid.uuid4().hex
    assert marks.record(operation_id, "0")
    expected = marks.paths(operation_id)
    assert set(expected) == {"0"}

    # When its marks are read on the project's client with redis-py's command path refused, Then they are the same
    def refused(self: object, *args: object, **options: object) -> None:
        raise AssertionError(f"read through redis-py's command path: {args}")

    with monkeypatch.context() as patched:
        patched.setattr(ThreadConnections, "execute_command", refused)
        assert marks.paths(operation_id) == expected
        assert marks.paths(uuid.uuid4().hex) == {}

    # ... and on a plain redis-py client too (its reply a dict, not a list of pairs)
    plain = redis.Redis(connection_pool=get_redis().connection_pool)
    elsewhere = StepMarks()
    elsewhere._client = plain
    assert elsewhere.paths(operation_id) == expected
