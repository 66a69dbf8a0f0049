"""Learning curves of fine-tuning runs, drawn from their `log.csv`.

One figure, one line per run: validation force MAE (meV/Å, log axis) and,
for STR runs, layer sparsity (% of targeted deltas at exactly zero) against
the optimiser step. `sparse-eqv curves RUN [RUN ...] -o FIGURE.png` draws
it for any runs, so the figures in docs/figures are the ones a user gets for
their own runs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.errors import SparseEqvError

LOG_FILE = "log.csv"


def read_log(run_dir: str | Path) -> dict[str, list[float]]:
    """The columns of RUN_DIR/log.csv as floats (empty cells: NaN), keyed by header.

    Raises SparseEqvError naming the file when it is missing, empty or lacks
    the `step` and `valid_forces_mae` columns.
    """
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise SparseEqvError(f"{path}: no such file (is {run_dir} a fine-tuning run directory?)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SparseEqvError(f"{path}: holds no epoch yet")
    missing = [c for c in ("step", "valid_forces_mae") if c not in rows[0]]
    if missing:
        raise SparseEqvError(f"{path}: lacks the column(s) {', '.join(missing)}")
    return {key: [float(row[key]) if row[key] not in ("", None) else math.nan for row in rows] for key in rows[0]}


def curves_figure(logs: dict[str, dict[str, list[float]]], title: str | None = None):
    """A matplotlib Figure of two panels over optimiser steps: validation
    force MAE (meV/Å, log scale) and layer sparsity (%); `logs` maps a line's
    label to `read_log`'s columns. Runs without a layer_sparsity column
    (full, ELoRA) appear in the first panel only."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    error_ax, sparsity_ax = figure.subplots(1, 2)
    for label, log in logs.items():
        line, = error_ax.plot(log["step"], log["valid_forces_mae"], marker=".", label=label)
        if "layer_sparsity" in log:
            sparsity_ax.plot(log["step"], [100.0 * s for s in log["layer_sparsity"]], marker=".",
                             color=line.get_color(), label=label)
    error_ax.set_yscale("log")
    error_ax.set_xlabel("optimiser step")
    error_ax.set_ylabel("validation force MAE (meV/Å)")
    error_ax.grid(True, which="both", alpha=0.3)
    error_ax.legend(fontsize=8)
    sparsity_ax.set_xlabel("optimiser step")
    sparsity_ax.set_ylabel("layer sparsity (% of targeted deltas at zero)")
    sparsity_ax.set_ylim(0.0, 100.0)
    sparsity_ax.grid(True, alpha=0.3)
    if sparsity_ax.lines:
        sparsity_ax.legend(fontsize=8)
    else:
        sparsity_ax.text(0.5, 0.5, "no STR run", ha="center", va="center", transform=sparsity_ax.transAxes)
    if title:
        figure.suptitle(title)
    return figure


def write_curves(runs: Sequence[str | Path], output: str | Path, *, labels: Sequence[str] | None = None,
                 title: str | None = None) -> Path:
    """Draw `curves_figure` for these run directories into the PNG `output`
    (atomically); labels default to the run directories' names."""
    if labels is not None and len(labels) != len(runs):
        raise SparseEqvError(f"{len(labels)} label(s) for {len(runs)} run(s)")
    names = list(labels) if labels is not None else [Path(r).name for r in runs]
    logs = {name: read_log(run) for name, run in zip(names, runs)}
    figure = curves_figure(logs, title)
    with atomic_file(output) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return Path(output)
