"""The enqueue benchmark's pure parts: options and the result it prints (no servers)."""

from __future__ import annotations

import pytest

from benchmarks.enqueue import Cost, Options, build_result, parse_options


def test_defaults_and_flags():
    defaults = parse_options([])
    assert (defaults.operations, defaults.rounds, defaults.database, defaults.json_output) == (300, 5, "sqlite", False)
    given = parse_options(["--operations", "10", "--rounds", "2", "--database", "postgresql", "--json"])
    assert (given.operations, given.rounds, given.database, given.json_output) == (10, 2, "postgresql", True)


@pytest.mark.parametrize("argv", [["--operations", "0"], ["--rounds", "-1"], ["--database", "mysql"]])
def test_bad_sizes_and_databases_are_refused_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit):
        parse_options(argv)
    assert argv[0] in capsys.readouterr().err


def test_the_result_gives_each_variants_median_round_and_the_ratio_of_their_wall_times():
    costs = {
        "plain_dramatiq": [Cost(100, 0.05, 0.04), Cost(100, 0.07, 0.05), Cost(100, 0.06, 0.05)],
        "executors": [Cost(100, 0.15, 0.12), Cost(100, 0.12, 0.11), Cost(100, 0.30, 0.13)],
        "executors_unthrottled": [Cost(100, 0.09, 0.08), Cost(100, 0.12, 0.10), Cost(100, 0.10, 0.09)],
    }
    result = build_result(Options(operations=100, rounds=3), costs, database_url="sqlite:///x")
    assert result["plain_dramatiq_wall_ms_per_op"] == 0.6
    assert result["executors_wall_ms_per_op"] == 1.5
    assert result["executors_cpu_ms_per_op"] == 1.2
    assert result["executors_wall_ratio_to_plain"] == 2.5
    assert result["executors_unthrottled_wall_ratio_to_plain"] == 1.667
    assert result["variants"]["executors"]["rounds_wall_ms_per_op"] == [1.5, 1.2, 3.0]
