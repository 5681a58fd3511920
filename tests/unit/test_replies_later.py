"""Commands sent ahead on a thread's connection: their replies are read later, by the thread's next command or by
the settler when the thread goes quiet, and handed to their callback (real Redis)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import resources.replies_later as replies_later
from resources.redis_client import ThreadConnections, settle_replies
from tests.fixtures import wait_for


@pytest.fixture
def client(thread_client: ThreadConnections) -> ThreadConnections:
    return thread_client


@pytest.fixture
def key(client: ThreadConnections) -> Iterator[str]:
    key = f"{os.environ['JOBS_NAMESPACE']}:ahead-{uuid.uuid4().hex[:8]}"
    yield key
    client.delete(key)


@pytest.fixture
def no_settler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settler leaves owed replies alone for the length of the test."""
    monkeypatch.setattr(replies_later, "SETTLE_AFTER_S", 600.0)


class Answers:
    """What the callbacks got, and in which thread."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []

    def callback(self, label: str) -> Any:
        return lambda replies: self.got.append((label, replies, threading.current_thread().name))


def test_replies_reach_their_callbacks_in_order_before_the_threads_next_command(client, key, no_settler):
    # Given two sends ahead on this thread's connection, one with a command that fails
    answers = Answers()
    client.send_ahead([("SET", key, "1"), ("INCRBY", key, "x")], answers.callback("first"))
    client.send_ahead([("INCR", key)], answers.callback("second"))

    # Then no callback has run yet: nothing read the replies, not even the second send
    assert answers.got == []

    # When the thread sends its next command
    value = client.get(key)

    # Then both callbacks ran first, in this thread, in order, each with its replies (the error as its exception);
    # and the command got its own reply
    assert [(label, thread) for label, _, thread in answers.got] == [
        ("first", threading.current_thread().name),
        ("second", threading.current_thread().name),
    ]
    first, second = answers.got[0][1], answers.got[1][1]
    assert first[0] in (True, "OK") and isinstance(first[1], redis.ResponseError)
    assert second == [2]
    assert value == "2"


def test_the_replies_of_a_thread_that_went_quiet_are_read_by_the_settler(client, key):
    # Given a thread that sends ahead and ends, sending nothing more
    answers = Answers()
    thread = threading.Thread(target=lambda: client.send_ahead([("INCR", key)], answers.callback("quiet")))
    thread.start()
    thread.join(timeout=30)

    # Then its callback runs all the same, in the settler's thread
    wait_for(lambda: answers.got, timeout_s=30)
    assert answers.got == [("quiet", [1], "redis-reply-settler")]


def test_settle_replies_runs_every_owed_callback_now(client, key, no_settler):
    # Given replies owed to another thread, which ended, and to this one
    answers = Answers()
    thread = threading.Thread(target=lambda: client.send_ahead([("INCR", key)], answers.callback("there")))
    thread.start()
    thread.join(timeout=30)
    client.send_ahead([("INCR", key)], answers.callback("here"))

    # When they are settled
    settle_replies()

    # Then both callbacks have run, with their replies
    assert sorted((label, replies) for label, replies, _ in answers.got) == [("here", [2]), ("there", [1])]


def test_a_connection_lost_with_replies_owed_hands_the_error_to_their_callbacks_and_the_next_command_reconnects(
    client, key, no_settler
):
    # Given a thread waiting for a reply that will not come before its connection is closed (a blocking pop)
    answers = Answers()
    lost = client.client_id()
    client.send_ahead([("BLPOP", f"{key}:never", 0)], answers.callback("blocked"))
    client.send_ahead([("INCR", key)], answers.callback("after"))
    observer = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    wait_for(lambda: "b" in observer.client_list(client_id=[lost])[0]["flags"], timeout_s=30)

    # When Redis closes the connection and the thread sends its next command
    assert observer.client_kill_filter(_id=lost) == 1
    new = client.client_id()

    # Then both callbacks got the connection's error, and the command went over a new connection
    assert [(label, type(replies)) for label, replies, _ in answers.got] == [
        ("blocked", redis.ConnectionError),
        ("after", redis.ConnectionError),
    ]
    assert new != lost


def test_a_failing_callback_is_logged_and_the_command_that_read_its_reply_goes_on(client, key, no_settler, caplog):
    def fail(_replies: Any) -> None:
        raise RuntimeError("callback failed on purpose")

    client.send_ahead([("INCR", key)], fail)
    assert client.incr(key) == 2
    assert "callback failed on purpose" in caplog.text
