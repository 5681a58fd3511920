"""The idle benchmark's pure parts: options, figures, reading a process group's CPU time (no workers)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.cpu import group_cpu_s
from benchmarks.idle import Figures, parse_options
from tests.fixtures import wait_for


def test_defaults_and_flags():
    defaults = parse_options([])
    assert (defaults.idle_s, defaults.samples, defaults.processes, defaults.threads) == (10.0, 20, 2, 8)
    given = parse_options(["--idle-s", "3", "--samples", "5", "--processes", "1", "--threads", "2", "--json"])
    assert (given.idle_s, given.samples, given.processes, given.threads, given.json) == (3.0, 5, 1, 2, True)


@pytest.mark.parametrize("argv", [["--idle-s", "0"], ["--samples", "-1"], ["--threads", "0"]])
def test_sizes_below_one_are_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit):
        parse_options(argv)
    assert argv[0] in capsys.readouterr().err


def test_figures_give_the_median_and_the_worst_pick_up():
    figures = Figures(idle_cpu_percent=1.234, redis_commands_per_s=10.06, pick_up_ms=[5.0, 1.0, 3.0, 100.0])
    assert figures.as_dict() == {
        "idle_cpu_percent": 1.23,
        "redis_commands_per_s": 10.1,
        "pick_up_ms_p50": 4.0,
        "pick_up_ms_max": 100.0,
    }


def test_a_process_groups_cpu_time_grows_while_it_works():
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc here")
    # A busy child in a process group of its own
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        wait_for(lambda: group_cpu_s(busy.pid) >= 0.05, timeout_s=30)
    finally:
        busy.kill()
        busy.wait()
    assert group_cpu_s(busy.pid) == 0  # gone: nothing of the group is left to count
