"""The A/B benchmark's parts that need no workers: the order of each pair, the summary, the child's command and
figures, and a run over a copy of a revision with made-up rounds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks.ab import Pair, RoundFigures, child_command, figures_of, pair_order, run, summarize
from benchmarks.throughput import REPO_ROOT


def figures(ops_per_s: float, cpu: float | None = 4.0) -> RoundFigures:
    return RoundFigures(ops_per_s, cpu)


def test_the_sides_take_turns_going_first() -> None:
    assert [pair_order(index) for index in range(4)] == [
        ("this", "base"),
        ("base", "this"),
        ("this", "base"),
        ("base", "this"),
    ]


def test_summary_gives_each_pairs_ratio_their_median_and_the_wins() -> None:
    pairs = [
        Pair(figures(110.0, 3.0), figures(100.0, 4.0)),
        Pair(figures(90.0, 3.2), figures(100.0, 4.2)),
        Pair(figures(130.0, None), figures(100.0, 4.4)),
    ]
    summary = summarize(pairs)
    assert [pair["ratio"] for pair in summary["pairs"]] == [1.1, 0.9, 1.3]
    assert summary["median_ratio"] == 1.1
    assert summary["this_higher_in"] == 2
    assert summary["this_ops_per_s"] == 110.0
    assert summary["base_ops_per_s"] == 100.0
    assert summary["this_cpu_ms_per_op"] == 3.1  # the round that read no CPU is left out
    assert summary["base_cpu_ms_per_op"] == 4.2


def test_the_child_runs_one_round_of_the_executors_only() -> None:
    command = child_command(500, "postgresql")
    assert command[1:4] == ["-m", "benchmarks.throughput", "--json"]
    assert command[command.index("--variants") + 1] == "executors"
    assert command[command.index("--rounds") + 1] == "1"
    assert command[command.index("--operations") + 1] == "500"
    assert command[command.index("--database") + 1] == "postgresql"


def test_a_childs_failed_round_is_raised_not_counted() -> None:
    ok = {"executors_ops_per_s": 412.5, "variants": {"executors": {"error": None, "cpu_ms_per_op": 3.9}}}
    assert figures_of(ok) == RoundFigures(412.5, 3.9)
    failed = {"executors_ops_per_s": None, "variants": {"executors": {"error": "RuntimeError: boom"}}}
    with pytest.raises(RuntimeError, match="boom"):
        figures_of(failed)


def _in_a_git_checkout() -> bool:
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.skipif(not _in_a_git_checkout(), reason="needs this project's git history")
def test_a_run_compares_this_checkout_with_a_copy_of_the_base() -> None:
    seen: list[Path] = []

    def fake_round(tree: Path, operations: int, database: str) -> RoundFigures:
        seen.append(tree)
        assert (tree / "benchmarks" / "throughput.py").is_file()  # each copy holds its side's code
        if tree.name == "this":
            # The checkout as it is now, its new files included (this test file may not be committed yet).
            assert (tree / "tests" / "unit" / Path(__file__).name).read_bytes() == Path(__file__).read_bytes()
            return figures(200.0)
        return figures(100.0)

    result = run("HEAD", 3, 50, "sqlite", run_round=fake_round)
    assert result["median_ratio"] == 2.0 and result["this_higher_in"] == 3
    assert len(result["pairs"]) == 3 and result["operations"] == 50
    assert [tree.name for tree in seen] == ["this", "base", "base", "this", "this", "base"]  # turns to go first
    assert seen[0].parent == seen[1].parent  # both copies on one disk
    assert not seen[0].exists() and not seen[1].exists()  # removed at the end


@pytest.mark.skipif(not _in_a_git_checkout(), reason="needs this project's git history")
def test_an_unknown_base_is_refused_naming_it() -> None:
    with pytest.raises(SystemExit, match="no-such-revision"):
        run("no-such-revision", 1, 50, "sqlite", run_round=lambda *args: figures(1.0))
