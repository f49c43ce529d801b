"""The benchmark's output: a table of runs, the targets checked against them, and the JSON report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jachat.bench.targets import TARGETS
from jachat.bench.workload import Report


def write_report(output: Path, document: dict[str, Any], say: bool = True) -> None:
    """A benchmark's JSON report (its folder made), and a line saying where it went."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    if say:
        print(f"\nwritten to {output}")


def table(reports: list[Report]) -> str:
    header = (
        f"{'run':<34} {'conc':>4} {'reqs':>5} {'tok/s':>8} {'TTFT p50/p90/p99 (ms)':>24} "
        f"{'ITL p50/p90/p99 (ms)':>22} {'e2e p50/p99 (s)':>16}  errors"
    )
    lines = [header, "-" * len(header)]

    def ms(d: dict[str, float]) -> str:
        return "/".join(f"{d[k] * 1000:.0f}" if not math.isnan(d[k]) else "-" for k in ("p50", "p90", "p99"))

    for r in reports:
        e2e = f"{r.e2e['p50']:.2f}/{r.e2e['p99']:.2f}"
        errors = ", ".join(f"{k}:{v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"{r.name:<34} {r.concurrency:>4} {r.requests:>5} {r.tokens_per_second:>8.1f} "
            f"{ms(r.ttft):>24} {ms(r.itl):>22} {e2e:>16}  {errors}"
        )
    return "\n".join(lines)


def ratios(reports: dict[str, Report], concurrency: int) -> list[tuple[str, float, float, bool, bool]]:
    """(what, measured, target, floor, met) for each target whose runs are in reports."""
    rows = []
    for target in TARGETS:
        value = target.measure(reports)
        if value is not None:
            met = value >= target.limit if target.floor else value <= target.limit
            rows.append((target.what.format(n=concurrency), value, target.limit, target.floor, met))
    return rows


def print_results(reports: dict[str, Report], concurrency: int, output: Path | None, meta: dict[str, Any]) -> int:
    print(table(list(reports.values())))
    rows = ratios(reports, concurrency)
    if rows:
        print()
        for what, value, target, floor, met in rows:
            print(
                f"{what:<66} {value:8.2f}  target {'>=' if floor else '<='} {target:<5} {'met' if met else 'NOT MET'}"
            )
    if output is not None:
        document = {
            "meta": meta,
            "reports": {k: asdict(v) for k, v in reports.items()},
            "targets": [{"what": w, "value": v, "target": t, "floor": f, "met": m} for w, v, t, f, m in rows],
        }
        write_report(output, document)
    return 0 if all(row[-1] for row in rows) else 1
