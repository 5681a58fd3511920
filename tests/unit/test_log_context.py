"""Every log line of a step names its operation, resource and throttle scope; JOBS_LOG_FORMAT=json;
JOBS_LOG_LEVEL."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import dramatiq
import pytest
from click.testing import CliRunner
from dramatiq import Message

from jobs import queues
from jobs.broker import broker as project_broker
from jobs.broker import build_broker
from jobs.cli import main as jobs_cli
from jobs.executors import InstanceCreateExecutor
from jobs.processes import start_worker
from middleware import LogContext
from resources.backends import SimulatedCloud, SimulatedConfig
from resources.config import get_settings, log_format_from_env, log_level_from_env
from resources.errors import ConfigurationError
from resources.logs import (
    CONTEXT_FIELDS,
    ContextJsonFormatter,
    ContextTextFormatter,
    LogContextFilter,
    LogFields,
    configure_logging,
    current_log_fields,
    install_log_format,
    set_log_fields,
)
from tests.conftest import SQLITE_INTEGRATION_URL
from tests.fixtures import drain, make_instance, make_tenant, reset_database, wait_for

#: The dramatiq CLI's own format, which worker processes keep (plus the context).
DRAMATIQ_FORMAT = "[%(asctime)s] [PID %(process)d] [%(threadName)s] [%(name)s] [%(levelname)s] %(message)s"

probe_logger = logging.getLogger("tests.log_probe")


@dramatiq.actor(queue_name=queues.DEFAULT, max_retries=0)
def log_probe(marker: str) -> None:
    """A message that is no step of any operation."""
    probe_logger.info("probe %s", marker)


class Collector(logging.Handler):
    """A root handler with the filter, as worker processes have one: keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(LogContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Collector]:
    """Records of our loggers (INFO), SQLAlchemy's statements (INFO) and Dramatiq's worker threads (DEBUG)."""
    collector = Collector()
    levels = {"": logging.INFO, "resources.transitions": logging.DEBUG, "dramatiq.worker": logging.DEBUG}
    levels["sqlalchemy.engine"] = logging.INFO
    previous = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger().addHandler(collector)
    try:
        yield collector
    finally:
        logging.getLogger().removeHandler(collector)
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def _fields(record: logging.LogRecord) -> dict[str, str]:
    return {name: getattr(record, name) for name in CONTEXT_FIELDS}


def _one(records: list[logging.LogRecord], logger: str, text: str) -> logging.LogRecord:
    found = [r for r in records if r.name == logger and text in r.getMessage()]
    assert found, f"no record of {logger} with {text!r}"
    return found[0]


def test_lines_logged_in_a_step_carry_its_operation_resource_and_scope(stub_broker, stub_worker, cloud, captured):
    # Given an instance of a tenant (its creation is throttled per type and tenant)
    tenant = make_tenant()
    instance = make_instance(tenant, volumes=1)
    scope = f"provision:instance:{tenant.uuid},provision:volume:{tenant.uuid}"  # the volumes' executor adds its own
    main_thread = threading.current_thread().name

    # When it is created
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    assert handle.status() == "succeeded"

    # Then the transition logged by its first step names the step's operation, resource, scope and actor
    transition = _one(captured.records, "resources.transitions", f"{instance.ref}: begin_creating")
    assert _fields(transition) == {
        "operation_id": handle.id,
        "resource_ref": instance.ref,
        "throttle_scope": scope,
        "actor_name": "state_transition",
        "message_id": transition.message_id,
    }
    assert uuid.UUID(transition.message_id)
    # ... so do lines of the volume's steps (their own resource, the operation's scope), of middleware
    # after-hooks (the operation's end) and of other libraries (SQLAlchemy's statements)
    volume_lines = [
        r
        for r in captured.records
        if r.name == "resources.transitions" and r.getMessage().startswith("volume:") and r.threadName != main_thread
    ]
    assert volume_lines
    for record in volume_lines:
        assert (record.operation_id, record.throttle_scope) == (handle.id, scope)
        assert record.resource_ref == record.getMessage().split(": ")[0]
    succeeded = _one(captured.records, "middleware.progress", "succeeded")
    assert (succeeded.operation_id, succeeded.throttle_scope) == (handle.id, scope)
    assert any(r.name.startswith("sqlalchemy.engine") and r.operation_id == handle.id for r in captured.records)

    # ... and the text format shows them in brackets before the message, keeping the given format
    line = ContextTextFormatter(DRAMATIQ_FORMAT).format(transition)
    assert f"[DEBUG] [op={handle.id} ref={instance.ref} scope={scope} actor=state_transition msg=" in line
    assert line.endswith(f"] {instance.ref}: begin_creating -> CREATING")


def test_nothing_of_a_message_leaks_into_the_next_one_or_after_it(stub_broker, stub_worker, cloud, captured):
    # Given an operation whose steps ran on every worker thread
    handle = InstanceCreateExecutor.execute(make_instance(make_tenant(), volumes=2))
    drain(stub_broker)
    assert handle.status() == "succeeded"

    # When plain messages (no operation) run on the same threads, and this thread logs afterwards
    for index in range(12):
        log_probe.send(str(index))
    drain(stub_broker)
    probe_logger.info("after everything")

    # Then the probes' lines name their own actor and message, and nothing of the operation
    probes = [r for r in captured.records if r.name == "tests.log_probe" and r.getMessage().startswith("probe")]
    assert len(probes) == 12
    assert {r.threadName for r in probes} & {r.threadName for r in captured.records if r.operation_id == handle.id}
    for record in probes:
        assert (record.operation_id, record.resource_ref, record.throttle_scope) == ("", "", "")
        assert record.actor_name == "log_probe"
        assert record.message_id
    # ... Dramatiq's "Received message" line, logged by a worker thread before any middleware hook of the
    # message runs, carries nothing of the message that thread processed before
    received = [r for r in captured.records if r.getMessage().startswith("Received message")]
    assert len(received) > 12
    assert all(_fields(r) == dict.fromkeys(CONTEXT_FIELDS, "") for r in received)
    # ... nor does a line logged outside any message, which the text format shows without brackets
    after = _one(captured.records, "tests.log_probe", "after everything")
    assert _fields(after) == dict.fromkeys(CONTEXT_FIELDS, "")
    assert ContextTextFormatter(DRAMATIQ_FORMAT).format(after).endswith("[tests.log_probe] [INFO] after everything")


@pytest.mark.parametrize("hook", ["after_process_message", "after_skip_message"])
def test_the_fields_are_cleared_after_a_processed_or_skipped_message(hook):
    middleware = LogContext()
    message = Message(
        queue_name="default",
        actor_name="backend_method",
        args=(),
        kwargs={},
        options={"operation_id": "op-1", "resource": "instance:" + "a" * 32, "throttle": [["s1", 2], ["s2", 1]]},
    )
    middleware.before_process_message(project_broker, message)
    assert current_log_fields() == LogFields(
        "op-1", "instance:" + "a" * 32, "s1,s2", "backend_method", message.message_id
    )

    getattr(middleware, hook)(project_broker, message)

    assert current_log_fields() == LogFields()


def test_a_malformed_throttle_option_does_not_lose_the_other_fields():
    message = Message(queue_name="default", actor_name="a", args=(), kwargs={}, options={"throttle": 5})
    LogContext().before_process_message(project_broker, message)
    try:
        assert current_log_fields() == LogFields(actor_name="a", message_id=message.message_id)
    finally:
        set_log_fields(None)


def test_json_lines_of_a_failed_step_carry_its_fields_and_the_exception(stub_broker, stub_worker, cloud, captured):
    # Given a cloud where creating the instance fails for good
    cloud.configure(SimulatedConfig(build_ms=40, failures={"instance.create": 1.0}))
    instance = make_instance(make_tenant(), volumes=0)

    # When it is created, and its lines are written as JSON
    handle = InstanceCreateExecutor.execute(instance)
    drain(stub_broker)
    assert handle.status() == "failed"
    formatter = ContextJsonFormatter()
    failed = next(r for r in captured.records if r.exc_info and r.operation_id == handle.id)
    document = json.loads(formatter.format(failed))

    # Then each is one parseable JSON object with the time in UTC, the level, logger, message, process,
    # thread, the step's fields and the formatted exception
    assert list(document)[:6] == ["time", "level", "logger", "message", "process", "thread"]
    assert document["time"].endswith("Z")
    assert datetime.fromisoformat(document["time"]).utcoffset().total_seconds() == 0
    assert (document["level"], document["process"], document["thread"]) == ("ERROR", os.getpid(), failed.threadName)
    assert document["logger"] == failed.name
    assert document["message"] == failed.getMessage()
    assert document["operation_id"] == handle.id
    assert document["resource_ref"] == instance.ref
    assert document["throttle_scope"].startswith("provision:instance:")
    assert document["actor_name"] == failed.actor_name
    assert document["message_id"] == failed.message_id
    assert document["exc_info"].startswith("Traceback (most recent call last):")
    assert "BackendError" in document["exc_info"] or "Simulated" in document["exc_info"]
    assert "\n" not in formatter.format(failed)
    # ... and outside a step the fields are null, not missing
    outside = json.loads(
        formatter.format(logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None))
    )
    assert outside["message"] == "hello you"
    assert all(outside[name] is None for name in CONTEXT_FIELDS)
    assert "exc_info" not in outside and "log_context" not in outside


@pytest.fixture
def root_handler() -> Iterator[tuple[logging.Handler, io.StringIO]]:
    """A root handler as the dramatiq CLI sets it up in a worker process (stdlib Formatter, its format)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(DRAMATIQ_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler, stream
    finally:
        root.removeHandler(handler)


def test_installing_reformats_the_root_handlers_once_and_leaves_other_formatters(root_handler, caplog, monkeypatch):
    handler, stream = root_handler
    caplog.set_level(logging.INFO)
    pytest_formatter = caplog.handler.formatter
    logger = logging.getLogger("tests.log_install")

    # When the text format is installed twice (jobs.app and scheduler.app both import it)
    install_log_format()
    install_log_format()
    set_log_fields(LogFields(operation_id="op-7", resource_ref="volume:" + "b" * 32))
    try:
        logger.info("in a step")
    finally:
        set_log_fields(None)
    logger.info("outside")

    # Then the handler has one filter and the dramatiq format plus the context, shown only when present
    assert sum(isinstance(f, LogContextFilter) for f in handler.filters) == 1
    first, second = stream.getvalue().splitlines()
    assert first.endswith(f"[tests.log_install] [INFO] [op=op-7 ref=volume:{'b' * 32}] in a step")
    assert second.endswith("[tests.log_install] [INFO] outside")
    assert first.startswith("[") and f"[PID {os.getpid()}]" in first
    # ... and a formatter of another class (the test runner's) is left as it was
    assert caplog.handler.formatter is pytest_formatter

    # When JOBS_LOG_FORMAT=json is installed
    monkeypatch.setenv("JOBS_LOG_FORMAT", "JSON")
    install_log_format()
    install_log_format()
    stream.truncate(0)
    stream.seek(0)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("it broke")

    # Then each record is one JSON line
    (line,) = stream.getvalue().splitlines()
    document = json.loads(line)
    assert (document["message"], document["level"], document["logger"]) == ("it broke", "ERROR", "tests.log_install")
    assert "RuntimeError: boom" in document["exc_info"]
    assert sum(isinstance(f, LogContextFilter) for f in handler.filters) == 1


@pytest.mark.parametrize("value", ["xml", "plain", "jsonl"])
def test_an_unknown_log_format_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("JOBS_LOG_FORMAT", value)
    expected = rf"JOBS_LOG_FORMAT='{value}' is not one of text, json; set it to text or json"
    for read in (log_format_from_env, get_settings, install_log_format):
        with pytest.raises(ConfigurationError, match=expected):
            read()
    # ... and a command stops with it, not with a traceback
    result = CliRunner().invoke(jobs_cli, ["migrate"])
    assert result.exit_code == 1
    assert f"JOBS_LOG_FORMAT='{value}' is not one of text, json" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_log_format_defaults_to_text(monkeypatch):
    monkeypatch.delenv("JOBS_LOG_FORMAT", raising=False)
    assert get_settings().log_format == "text"
    monkeypatch.setenv("JOBS_LOG_FORMAT", " Json ")
    assert get_settings().log_format == "json"


@contextmanager
def worker_process_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, log_path: Path) -> Iterator[None]:
    """A real worker process (dramatiq CLI) started with ``env``, writing to ``log_path``, on a namespace of its own and
    the integration SQLite database; stopped when the block ends."""
    monkeypatch.setenv("JOBS_NAMESPACE", f"{os.environ['JOBS_NAMESPACE']}-logs-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("DATABASE_URL", SQLITE_INTEGRATION_URL)
    monkeypatch.delenv("JOBS_BROKER")
    reset_database()
    cloud = SimulatedCloud()
    cloud.configure(SimulatedConfig(build_ms=0))
    worker = start_worker("worker", queues=["default"], threads=2, env=env, log_path=log_path)
    previous = dramatiq.get_broker()
    dramatiq.set_broker(build_broker())
    try:
        yield
    finally:
        worker.stop()
        dramatiq.set_broker(previous)
        cloud.reset()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_dramatiq_worker_process_writes_json_lines(monkeypatch, tmp_path):
    # Given a real worker process (dramatiq CLI) started with JOBS_LOG_FORMAT=json
    log_path = tmp_path / "worker.log"
    with worker_process_with({"JOBS_LOG_FORMAT": "json"}, monkeypatch, log_path):
        # When it runs an operation
        instance = make_instance(make_tenant(), volumes=0)
        handle = InstanceCreateExecutor.execute(instance)

        # Then its lines are JSON, the operation's end naming the operation, resource and scope
        def succeeded_line() -> dict | None:
            for line in log_path.read_text().splitlines():
                if line.startswith("{") and "succeeded" in line:
                    return json.loads(line)
            return None

        document = wait_for(succeeded_line, timeout_s=30)
        assert document["operation_id"] == handle.id
        assert document["resource_ref"] == instance.ref
        assert document["throttle_scope"].startswith("provision:instance:")
        assert document["logger"] == "middleware.progress"
        lines = log_path.read_text().splitlines()
        ready = [json.loads(line) for line in lines if "Worker process is ready" in line]
        assert ready and ready[0]["operation_id"] is None
    # ... every line of the worker processes is JSON; only the dramatiq master, which never imports the
    # project, writes its few lines of its own in text
    for line in log_path.read_text().splitlines():
        if "[dramatiq.MainProcess]" not in line:
            json.loads(line)


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    """The root logger, its level put back afterwards."""
    root = logging.getLogger()
    level = root.level
    try:
        yield root
    finally:
        root.setLevel(level)


def test_the_log_level_is_the_root_loggers_when_set_and_left_alone_when_not(monkeypatch, root_level):
    # Given a root logger at INFO, as the dramatiq CLI sets it
    root_level.setLevel(logging.INFO)

    # When the format is installed without JOBS_LOG_LEVEL, Then the level stays
    monkeypatch.delenv("JOBS_LOG_LEVEL", raising=False)
    install_log_format()
    assert root_level.level == logging.INFO
    assert get_settings().log_level is None

    # When it is installed with JOBS_LOG_LEVEL=Warning, Then the root logger writes from WARNING
    monkeypatch.setenv("JOBS_LOG_LEVEL", " Warning ")
    install_log_format()
    assert root_level.level == logging.WARNING
    assert get_settings().log_level == "warning"


def test_a_commands_verbose_flag_beats_the_log_level_which_beats_its_default(monkeypatch, root_level):
    monkeypatch.setenv("JOBS_LOG_LEVEL", "error")
    configure_logging(logging.INFO)
    assert root_level.level == logging.ERROR
    configure_logging(logging.INFO, level=logging.DEBUG)
    assert root_level.level == logging.DEBUG
    monkeypatch.delenv("JOBS_LOG_LEVEL")
    configure_logging(logging.INFO)
    assert root_level.level == logging.INFO


@pytest.mark.parametrize("value", ["verbose", "warn", "10"])
def test_an_unknown_log_level_is_a_clear_error(monkeypatch, root_level, value):
    monkeypatch.setenv("JOBS_LOG_LEVEL", value)
    root_level.setLevel(logging.INFO)
    expected = rf"JOBS_LOG_LEVEL='{value}' is not one of debug, info, warning, error, critical"
    for read in (log_level_from_env, get_settings, install_log_format, configure_logging):
        with pytest.raises(ConfigurationError, match=expected):
            read()
    assert root_level.level == logging.INFO  # nothing changed
    # ... and a command stops with it, not with a traceback
    result = CliRunner().invoke(jobs_cli, ["migrate"])
    assert result.exit_code == 1
    assert f"JOBS_LOG_LEVEL='{value}' is not one of debug, info, warning, error, critical" in result.output


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_dramatiq_worker_process_at_warning_writes_no_info_line(monkeypatch, tmp_path):
    # Given a real worker process (dramatiq CLI) started with JOBS_LOG_LEVEL=warning
    log_path = tmp_path / "worker.log"
    with worker_process_with({"JOBS_LOG_LEVEL": "warning"}, monkeypatch, log_path):
        # When it runs an operation to its end
        handle = InstanceCreateExecutor.execute(make_instance(make_tenant(), volumes=0))
        wait_for(lambda: handle.status() != "running", timeout_s=30)

    # Then it succeeded, and the worker processes wrote none of the INFO lines they write by default (the
    # operation's end, Dramatiq's start-up and shut-down); the dramatiq master, which never imports the project,
    # still wrote its own
    assert handle.status() == "succeeded"
    lines = log_path.read_text().splitlines()
    assert any("[dramatiq.MainProcess]" in line for line in lines)
    assert [line for line in lines if "[INFO]" in line and "[dramatiq.MainProcess]" not in line] == []
