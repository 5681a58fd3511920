"""The instruction-count benchmark's own parts: its arithmetic, its flags and its refusal without valgrind (no
callgrind run here; ``python -m benchmarks.instructions`` is the run)."""

from __future__ import annotations

import pytest

import benchmarks.instructions as instructions


@pytest.mark.parametrize("argv", [["--operations", "0"], ["--warm-up", "-1"]])
def test_sizes_below_one_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        instructions.main(argv)
    assert "must be positive" in capsys.readouterr().err


def test_without_valgrind_it_says_what_to_install(monkeypatch):
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="valgrind is not on the PATH: install it"):
        instructions.run(operations=10, warm_up=2)


def test_an_operations_cost_is_the_difference_of_two_runs_over_the_operations_between_them(monkeypatch):
    # Given counts of a fixed start-up plus a cost per operation for each variant
    start_up, cost = {"plain_dramatiq": 1_000_000, "executors": 3_000_000}, {"plain_dramatiq": 800, "executors": 1_300}
    monkeypatch.setattr(instructions.shutil, "which", lambda name: "/usr/bin/valgrind")
    monkeypatch.setattr(instructions, "count", lambda variant, n: start_up[variant] + cost[variant] * n)

    # When the benchmark runs
    result = instructions.run(operations=100, warm_up=20)

    # Then the start-up is gone from the figures, and the ratio compares the two
    assert result["plain_dramatiq_instructions_per_op"] == 800
    assert result["executors_instructions_per_op"] == 1_300
    assert result["ratio_executors_to_plain"] == 1.625
    assert (result["operations"], result["warm_up_operations"], result["steps"]) == (100, 20, 5)
