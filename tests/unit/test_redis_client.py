"""The project's Redis client: each thread's commands on a connection of its own, kept between commands."""

from __future__ import annotations

import gc
import os
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from resources.redis_client import ScriptCall, ThreadConnections, get_redis, pipelined, run_calls


@pytest.fixture
def client(thread_client: ThreadConnections) -> ThreadConnections:
    return thread_client


@pytest.fixture
def key(client: ThreadConnections) -> Iterator[str]:
    key = f"{os.environ['JOBS_NAMESPACE']}:client-{uuid.uuid4().hex[:8]}"
    yield key
    client.delete(key, f"{key}:token")


def _in_thread(work) -> object:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return out[0]


def test_a_thread_keeps_its_connection_and_another_thread_has_its_own(client):
    # Given one client used from two threads
    # When each thread sends commands
    here = {client.client_id() for _ in range(5)}
    there = _in_thread(lambda: {client.client_id() for _ in range(5)})

    # Then each thread's commands went over one connection, and not the other thread's
    assert len(here) == 1 and len(there) == 1
    assert here != there


def test_a_connection_the_server_closed_while_it_sat_unused_is_replaced_before_the_next_command(client, monkeypatch):
    # Given a thread's connection, which Redis then closes (as a restart would), and a command after it sat
    # unused (every command, here)
    import resources.redis_client as redis_client

    monkeypatch.setattr(redis_client, "CHECK_IDLE_AFTER_S", 0.0)
    closed = client.client_id()
    observer = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    assert observer.client_kill_filter(_id=closed) == 1

    # When the thread sends its next command
    # Then it goes over a new connection instead of failing on the closed one
    assert client.ping() is True
    assert client.client_id() != closed


def test_get_redis_is_such_a_client():
    assert isinstance(get_redis(), ThreadConnections)
    assert isinstance(get_redis(), redis.Redis)  # typed as, and usable as, redis-py's client


def test_a_script_registered_here_runs_in_another_thread_while_this_one_waits_in_a_blocking_command(client, key):
    # Given a script registered in this thread, which then blocks in BLPOP
    script = client.register_script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
    this_connection = client.client_id()
    observer = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)

    def other_thread() -> None:
        _wait_for(lambda: "b" in observer.client_list(client_id=[this_connection])[0]["flags"])
        # When another thread runs the script, then pushes the token this thread waits for
        script(keys=[key], args=["x"])
        client.rpush(f"{key}:token", "go")

    helper = threading.Thread(target=other_thread)
    helper.start()
    popped = client.blpop([f"{key}:token"], timeout=20)
    helper.join(timeout=30)

    # Then neither waited for the other: this thread got the token, not its timeout (a script bound to the
    # connection of the thread that registered it would have queued behind the BLPOP for its whole timeout)
    assert popped == (f"{key}:token", "go")
    assert client.lrange(key, 0, -1) == ["x"]


def test_a_pipeline_works_as_on_any_client(client, key):
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(key, "a").rpush(key, "b").lrange(key, 0, -1)
        assert pipe.execute()[-1] == ["a", "b"]


def test_a_forked_child_does_not_use_the_parents_connection(client):
    # Given a thread that has its connection
    parent_id = client.client_id()
    read_end, write_end = os.pipe()

    # When the process forks and the child sends a command
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(write_end, str(client.client_id()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child_id = int(os.read(read_end, 100).decode())
    os.waitpid(pid, 0)
    os.close(read_end)

    # Then the child's went over a connection of its own, and the parent's connection still works
    assert child_id != parent_id
    assert client.client_id() == parent_id


def test_a_thread_that_ends_gives_its_connection_back():
    # Given a client whose connections carry a name of their own
    name = f"test-{uuid.uuid4().hex[:8]}"
    client = ThreadConnections(redis.ConnectionPool.from_url(os.environ["REDIS_URL"], client_name=name))

    # When one thread after another sends a command and ends
    for _ in range(10):
        _in_thread(client.ping)
        gc.collect()

    # Then they took turns with the same connection instead of opening one each
    observer = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    assert len([c for c in observer.client_list() if c["name"] == name]) == 1
    client.connection_pool.disconnect()


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout_s, done.set)
    deadline.start()
    try:
        while not condition():
            if done.wait(0.01):
                raise AssertionError("condition not met in time")
    finally:
        deadline.cancel()


def test_calls_go_in_one_round_trip_in_order_even_when_the_server_lacks_a_script(client, key):
    # Given two scripts this server has never seen (a comment makes each one new)
    push = client.register_script(f"-- {uuid.uuid4().hex}\nreturn redis.call('RPUSH', KEYS[1], ARGV[1])")
    read = client.register_script(f"-- {uuid.uuid4().hex}\nreturn redis.call('LRANGE', KEYS[1], 0, -1)")

    # When they are run together, the second reading what the first wrote
    replies = run_calls(client, [ScriptCall(push, (key,), ("a",)), ScriptCall(push, (key,), ("b",))])
    then = run_calls(client, [ScriptCall(read, (key,), ())])

    # Then both ran, in order, each loaded on the way
    assert replies == [1, 2]
    assert then == [["a", "b"]]


def test_a_failing_call_raises_its_error(client, key):
    fail = client.register_script("return redis.error_reply('refused by the test')")
    push = client.register_script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
    push(keys=[key], args=["loaded"])
    with pytest.raises(redis.ResponseError):
        fail()  # loaded now: the failure below is the script's own, not a missing script
    with pytest.raises(redis.ResponseError, match="refused by the test"):
        run_calls(client, [ScriptCall(push, (key,), ("x",)), ScriptCall(fail)])


def test_commands_sent_together_use_the_threads_own_connection_and_answer_in_order(client, key):
    # Given a thread that has sent a command over its connection
    own = client.client_id()
    observer = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    name = f"round-trip-{uuid.uuid4().hex[:8]}"
    client.client_setname(name)

    # When it sends commands together, one of them failing
    replies = pipelined(client, [("SET", key, "1"), ("INCRBY", key, "x"), ("INCR", key), ("CLIENT", "ID")])

    # Then each reply is in its place, the error as its exception, and they went over that same connection (a
    # pipeline would have taken another one from the pool)
    assert replies[0] is True or replies[0] == "OK"
    assert isinstance(replies[1], redis.ResponseError)
    assert replies[2:] == [2, own]
    assert [c["id"] for c in observer.client_list() if c["name"] == name] == [str(own)]


def test_commands_sent_together_over_a_connection_the_server_closed_fail_as_a_pipelines_and_the_next_reconnect(
    client, key
):
    # Given a thread's connection that Redis closes while it was in use a moment ago (so it is not probed first)
    closed = client.client_id()
    observer = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    assert observer.client_kill_filter(_id=closed) == 1

    # When the thread sends commands together, then again
    # Then the first send fails as a pipeline's would (the pool's connections retry nothing), and the next ones
    # go over a new connection
    with pytest.raises(redis.ConnectionError):
        pipelined(client, [("SET", key, "1"), ("CLIENT", "ID")])
    replies = pipelined(client, [("SET", key, "1"), ("INCR", key), ("CLIENT", "ID")])
    assert replies[1] == 2 and replies[2] != closed


@pytest.mark.parametrize("value", [True, None, object()])
def test_a_value_redis_cannot_take_is_refused_before_anything_is_sent_as_redis_py_refuses_it(client, key, value):
    # When commands sent together carry a value that is not bytes, a string or a number
    with pytest.raises(redis.DataError) as raised:
        pipelined(client, [("SET", key, "1"), ("SET", key, value)])

    # Then it is refused as the client's own commands refuse it, naming the fix, and nothing was sent
    with pytest.raises(redis.DataError):
        client.set(key, value)
    assert "Convert" in str(raised.value)
    assert client.get(key) is None


@pytest.mark.parametrize("count", [1, 3])
def test_commands_sent_together_through_any_other_client_answer_the_same_way(key, count):
    # Given a plain redis-py client (a broker given one, say)
    plain = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    plain.set(key, "x")

    # When one command, or several, are sent together, the first failing
    replies = pipelined(plain, [("INCR", key), *[("GET", key)] * (count - 1)])

    # Then the error is its exception in its place, and the other replies follow it
    assert isinstance(replies[0], redis.ResponseError)
    assert replies[1:] == ["x"] * (count - 1)
