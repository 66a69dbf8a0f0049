"""Where STR changed the model, run against run: per output l and per e3nn
path, the density of non-zero deltas and |dW|/|W| (relative L2 norm over the
targeted entries of that cell), side by side, as markdown tables.

    .venv/bin/python scripts/compare_reports.py runs/conv/cu/runs/str-h_seed0 \
        runs/conv/sse-pbe/runs/str-h_seed0 runs/conv/aspirin/runs/str-h_seed0 --labels Cu SSE-PBE aspirin

Reads the numbers `sparse-eqv report` computes (sparse_eqv.report.report_tables).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cell(stats: dict | None) -> str:
    if stats is None or not stats["size"]:
        return "-"
    rel = stats["rel_l2"]
    return f"{100 * stats['density']:.1f} % / {'-' if rel is None else f'{rel:.2e}'}"


def tables(runs: list[Path], labels: list[str]) -> str:
    from sparse_eqv.report import report_tables

    reports = [report_tables(run) for run in runs]
    lines = []
    for name, title in (("l", "output l"), ("paths", "e3nn path (l_in x l_filter -> l_out)")):
        keys = []
        for report in reports:
            keys += [k for k in report[name] if k not in keys]
        lines += [f"**{title}**: non-zero deltas / |dW|/|W|", "",
                  f"| {title} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for key in keys:
            lines.append(f"| {key} | " + " | ".join(_cell(r[name].get(key)) for r in reports) + " |")
        lines.append("")
    lines += ["**totals**: layer sparsity / |dW|/|W| over all targeted entries", "",
              "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|",
              "| all targeted | " + " | ".join(
                  f"{100 * r['totals']['layer_sparsity']:.1f} % / {r['totals']['rel_l2']:.2e}" for r in reports) + " |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="STR run directories")
    parser.add_argument("--labels", nargs="+", default=None, help="a column name per run (default: directory names)")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    print(tables(args.runs, labels), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
