"""Draw the README's benchmark chart from the JSON the benchmarks print.

    python -m benchmarks.throughput --json > throughput-sqlite.json
    python -m benchmarks.throughput --json --database postgresql > throughput-postgresql.json
    python -m benchmarks.scale --json > scale.json
    python -m benchmarks.chart throughput-sqlite.json throughput-postgresql.json scale.json -o docs/benchmarks.png

Needs matplotlib (the ``bench`` extra). Each input is recognised by its keys.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

VARIANTS = (
    ("plain_dramatiq_ops_per_s", "plain Dramatiq"),
    ("executors_ops_per_s", "executors"),
    ("celery_ops_per_s", "Celery chain"),
)


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The throughput results (one per database) and the scale result, told apart by their keys."""
    throughput, scale = [], None
    for path in paths:
        data = json.loads(path.read_text())
        if "executors_ops_per_s" in data:
            throughput.append(data)
        elif data.get("benchmark") == "scale":
            scale = data
        else:
            raise SystemExit(f"{path}: neither a throughput nor a scale result; run the benchmark with --json")
    return throughput, scale


def scale_series(scale: dict[str, Any], path: str) -> tuple[list[int], list[float], list[float]]:
    """Backlog sizes with the p50 submit and hand-off cost (µs) of the levels that ran."""
    levels = [level for level in scale[path]["levels"] if "skipped" not in level]
    return (
        [level["backlog"] for level in levels],
        [level["submit_us"]["steady"]["p50"] for level in levels],
        [level["handoff_us"]["p50"] for level in levels],
    )


def draw(throughput: list[dict[str, Any]], scale: dict[str, Any] | None, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    panels = 1 + (scale is not None)
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    bars = axes[0][0]
    width = 0.8 / max(1, len(throughput))
    for index, result in enumerate(throughput):
        values = [result[key] for key, _label in VARIANTS]
        positions = [v + index * width for v in range(len(VARIANTS))]
        drawn = bars.bar(positions, values, width, label=result["database"])
        bars.bar_label(drawn, fmt="%.0f", fontsize=8)
    bars.set_xticks([v + width * (len(throughput) - 1) / 2 for v in range(len(VARIANTS))])
    bars.set_xticklabels([label for _key, label in VARIANTS])
    bars.set_ylabel("operations per second (five no-op steps each)")
    bars.set_title("Throughput, same processes and threads")
    bars.legend(title="database")
    if scale is not None:
        cost = axes[0][1]
        for path, label in (("throttle_store_path", "throttle"), ("executor_path", "execute()")):
            if path not in scale:
                continue
            backlog, submit, handoff = scale_series(scale, path)
            cost.plot(backlog, submit, marker="o", label=f"{label}: park")
            cost.plot(backlog, handoff, marker="s", label=f"{label}: hand-off")
        cost.set_xscale("log")
        cost.set_yscale("log")
        cost.set_xlabel("operations waiting (over 1,000 scopes)")
        cost.set_ylabel("µs per operation (p50)")
        cost.set_title("Cost per operation as the backlog grows")
        cost.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="JSON printed by the benchmarks")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/benchmarks.png"))
    options = parser.parse_args(argv)
    throughput, scale = load(options.results)
    draw(throughput, scale, options.output)
    print(options.output)


if __name__ == "__main__":
    main()
