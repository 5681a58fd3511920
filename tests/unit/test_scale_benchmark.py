"""The scale benchmark's pure parts: options, statistics, ratios, the budget and the JSON object; and its
throttle store path at tiny backlogs on embedded Redis servers of its own (a few seconds)."""

from __future__ import annotations

import json

import pytest

from benchmarks.scale import (
    DEFAULT_LEVELS,
    LevelRun,
    Options,
    build_result,
    fits_budget,
    flat_ratios,
    level_summary,
    means_by_tenth,
    parse_options,
    run,
    summarize_us,
)

MACHINE = {"cpus": 2, "python": "3.11.0", "platform": "Linux", "redis": "embedded", "redis_version": "6.2.14"}


def _level(backlog: int, submit_s: float, handoff_s: float, *, memory_per_op: int = 1000) -> LevelRun:
    return LevelRun(
        backlog,
        holders=4,
        scopes=4,
        build_s=1.0,
        build_submits=[submit_s] * backlog,
        steady_submits=[submit_s] * 10,
        steady_handoffs=[handoff_s] * 10,
        memory_before=1_000_000,
        memory_after=1_000_000 + memory_per_op * backlog,
        footprint={"message_list": 545.0, "operation_hash": 256.0, "waiters_entry": 50.0, "total": 851.0},
        backlog_intact=True,
    )


# -- options ----------------------------------------------------------------------------------------------------


def test_defaults_are_three_levels_over_a_thousand_scopes_of_limit_one():
    options = parse_options([])

    assert options.levels == DEFAULT_LEVELS == (1_000, 10_000, 100_000)
    assert (options.scopes, options.limit, options.sample) == (1_000, 1, 1_000)
    assert options.executor_backlogs == options.levels  # as far as the budget allows
    assert options.database == "sqlite"
    assert not options.json_output


def test_flags_set_levels_sorted_without_repeats_and_the_executor_levels():
    options = parse_options(
        ["--json", "--levels", "20,10,1_0", "--scopes", "3", "--sample", "6", "--rounds", "2", "--budget", "0"]
    )

    assert options.levels == (10, 20)
    assert (options.scopes, options.sample, options.rounds, options.budget_s) == (3, 6, 2, 0.0)
    assert options.json_output
    assert parse_options(["--executor-levels", "none"]).executor_backlogs == ()
    assert parse_options(["--executor-levels", "500,100"]).executor_backlogs == (100, 500)


@pytest.mark.parametrize(
    "argv",
    [
        ["--levels", "0"],
        ["--levels", "ten"],
        ["--levels", ","],
        ["--scopes", "0"],
        ["--sample", "-1"],
        ["--executor-levels", "5,x"],
        ["--database", "oracle"],
    ],
)
def test_bad_values_are_refused(argv: list[str]):
    with pytest.raises(SystemExit):
        parse_options(argv)


# -- statistics -------------------------------------------------------------------------------------------------


def test_summaries_are_in_microseconds():
    summary = summarize_us([0.001, 0.002, 0.003])

    assert summary == {"n": 3, "mean": 2000.0, "p50": 2000.0, "p99": 2980.0, "max": 3000.0}
    assert summarize_us([]) == {"n": 0, "mean": None, "p50": None, "p99": None, "max": None}


def test_means_by_tenth_show_a_cost_that_grows_while_the_backlog_fills():
    assert means_by_tenth([1e-6] * 10 + [3e-6] * 10) == [1.0] * 5 + [3.0] * 5
    assert means_by_tenth([2e-6, 4e-6, 6e-6]) == [2.0, 4.0, 6.0]  # fewer samples than tenths
    assert means_by_tenth([]) == []


def test_a_level_reports_the_last_sample_of_its_build_and_memory_per_parked_operation():
    run_ = _level(100, 0.0002, 0.0005)
    run_.build_submits = [0.001] * 90 + [0.0002] * 10

    summary = level_summary(run_, sample=10)

    assert summary["submit_us"]["build_last"] == summarize_us([0.0002] * 10)
    assert summary["submit_us"]["build_mean_by_tenth"][0] == 1000.0
    assert summary["handoff_us"]["p50"] == 500.0
    assert summary["redis_memory"]["per_parked_op_bytes"] == 1000.0
    assert summary["waiters_per_scope"] == 25.0
    assert summary["checks"] == {"backlog_intact": True, "handoffs_to_head_of_line": True}


def test_flat_ratio_is_the_largest_backlog_over_the_smallest_ignoring_skipped_levels():
    levels = [
        level_summary(_level(10, 0.0002, 0.0004), 10),
        level_summary(_level(1000, 0.0003, 0.0004, memory_per_op=900), 10),
        {"backlog": 100_000, "skipped": "over the budget"},
    ]

    ratios = flat_ratios(levels)

    assert (ratios["submit"], ratios["handoff"], ratios["memory_per_parked_op"]) == (1.5, 1.0, 0.9)
    assert "1000" in ratios["basis"] and "10" in ratios["basis"]
    assert flat_ratios(levels[:1])["submit"] is None
    assert flat_ratios([])["handoff"] is None


def test_budget_projection_has_a_margin_and_zero_means_no_limit():
    fits, projected = fits_budget(100, 0.01, elapsed_s=0.0, budget_s=2.0)
    assert fits and projected == pytest.approx(1.2)
    assert not fits_budget(100, 0.01, elapsed_s=1.0, budget_s=2.0)[0]
    assert fits_budget(10**9, 1.0, elapsed_s=1e6, budget_s=0)[0]


def test_the_json_object_has_both_paths_machine_and_database():
    options = Options(levels=(10, 1000), executor_levels=(10,))
    store = [level_summary(_level(10, 0.0002, 0.0004), 10), level_summary(_level(1000, 0.0002, 0.0004), 10)]
    executor = [level_summary(_level(10, 0.02, 0.03), 10)]

    result = build_result(
        options,
        store,
        executor,
        message_body_bytes=361,
        machine=MACHINE,
        database_url="sqlite:///<temporary directory>/bench.sqlite3",
        duration_s=12.34,
    )

    assert json.loads(json.dumps(result)) == result
    assert {"throttle_store_path", "executor_path", "machine", "database", "levels", "scopes"} <= set(result)
    assert result["throttle_store_path"]["flat_ratio"]["submit"] == 1.0
    assert result["executor_path"]["flat_ratio"]["submit"] is None  # one level only
    assert result["parked_message_body_bytes"] == 361
    assert result["database"] == "sqlite"


# -- the store path, for real, at tiny backlogs -----------------------------------------------------------------


def test_store_path_at_tiny_levels_keeps_the_backlog_and_hands_off_in_line():
    options = Options(levels=(10, 20), scopes=3, sample=6, rounds=2, executor_levels=(), settle_s=0.0)

    result = run(options)

    assert json.loads(json.dumps(result)) == result
    levels = result["throttle_store_path"]["levels"]
    assert [level["backlog"] for level in levels] == [10, 20]
    for level in levels:
        assert level["checks"] == {"backlog_intact": True, "handoffs_to_head_of_line": True}
        assert level["submit_us"]["steady"]["n"] == level["handoff_us"]["n"] == 6
        assert level["submit_us"]["build_last"]["n"] == 6
        assert level["redis_memory"]["keys_per_parked_op_bytes"]["total"] > result["parked_message_body_bytes"] > 100
    assert result["throttle_store_path"]["flat_ratio"]["submit"] is not None
    assert result["executor_path"]["levels"] == []
    assert result["machine"]["redis_version"]
