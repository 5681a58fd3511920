"""The frame every benchmark's ``main`` runs in: JSON or a table, its exit status, and a stop that unwinds."""

from __future__ import annotations

import json
import os
import signal

import pytest

from benchmarks.entry import INTERRUPTED, report


@pytest.fixture(autouse=True)
def _keep_sigterm_handler():
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


def test_the_result_is_printed_as_one_json_object_and_decides_the_exit_status(capsys):
    status = report(
        lambda: {"ratio": 0.5}, json_output=True, render=_never, exit_status=lambda result: int(result["ratio"] < 1)
    )
    assert json.loads(capsys.readouterr().out) == {"ratio": 0.5}
    assert status == 1


def test_without_json_the_result_is_rendered(capsys):
    rendered = []
    assert report(lambda: {"a": 1}, json_output=False, render=lambda result, console: rendered.append(result)) == 0
    assert rendered == [{"a": 1}]


def test_sigterm_unwinds_the_run_like_ctrl_c(capsys):
    # A run's clean-up lives in its finally blocks: SIGTERM must reach them, as Ctrl-C does
    cleaned = []

    def run() -> dict:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the run")
        finally:
            cleaned.append(True)

    assert report(run, json_output=True, render=_never, undone="keys deleted") == INTERRUPTED
    assert cleaned == [True]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "interrupted; keys deleted" in captured.err


def _never(result, console):
    raise AssertionError("rendered a table for a JSON run")
