"""Bench 6: client CPU per image, in ms: the flow process vs the hand-written baseline.

CPU = user + system time of the process that runs the work (all its threads), between the start
and the end of the timed flow / script, divided by images persisted; the ephemeral Prefect API
server (a child process of the flow process) is reported separately. The figures come from the
overhead runs (``overhead.measure``), so ``run_all`` measures them once; standalone this runs a
small overhead pair.

    python bench/client_cpu.py [--n 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def from_summary(summary: dict[int, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Rows of (N, side, CPU ms/image, server CPU ms/image, ratio to baseline)."""
    rows = []
    for n, sides in summary.items():
        for side, fig in sides.items():
            rows.append(
                {
                    "n": n,
                    "side": side,
                    "cpu_ms_per_image": fig["cpu_ms_per_image"],
                    "server_cpu_ms_per_image": fig["server_cpu_ms_per_image"],
                    "cpu_ratio": fig.get("cpu_ratio", float("nan")),
                }
            )
    return rows


def main() -> None:
    import overhead

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    rows = from_summary(
        overhead.summarize(overhead.measure([args.n], concurrency=args.concurrency))
    )
    print(f"{'N':>6} {'side':<18}{'client CPU ms/image':>20}{'server CPU ms/image':>20}{'x':>7}")
    for r in rows:
        print(
            f"{r['n']:>6} {r['side']:<18}{r['cpu_ms_per_image']:>20.1f}"
            f"{r['server_cpu_ms_per_image']:>20.1f}{r['cpu_ratio']:>7.2f}"
        )


if __name__ == "__main__":
    main()
