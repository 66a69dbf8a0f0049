"""Learning curves of fine-tuning runs, drawn from their `log.csv`.

One figure, one line per run: training loss, validation energy and force
MAE (meV/atom, meV/Å; log axes) and, for STR runs, layer sparsity (% of
targeted deltas at exactly zero) against the optimiser step. `sparse-eqv curves RUN [RUN ...] -o FIGURE.png` draws
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


# (log.csv column, y label, log scale): the panels, left to right; a panel no run has a column for is left out.
PANELS = (
    ("train_loss", "training loss (weighted)", True),
    ("valid_energy_mae", "validation energy MAE (meV/atom)", True),
    ("valid_forces_mae", "validation force MAE (meV/Å)", True),
    ("layer_sparsity", "layer sparsity (% of targeted deltas at zero)", False),
)


def curves_figure(logs: dict[str, dict[str, list[float]]], title: str | None = None):
    """A matplotlib Figure of one panel per PANELS column that some run logged,
    against the optimiser step, one line per run (the same colour in every
    panel); `logs` maps a line's label to `read_log`'s columns. Runs without a
    column (full and ELoRA have no layer_sparsity) are absent from that panel."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in PANELS if any(p[0] in log for log in logs.values())]
    figure = Figure(figsize=(4.6 * len(panels), 4.0), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    colours = {label: f"C{k}" for k, label in enumerate(logs)}
    for ax, (column, ylabel, log_scale) in zip(axes, panels):
        for label, log in logs.items():
            if column in log:
                scale = 100.0 if column == "layer_sparsity" else 1.0
                ax.plot(log["step"], [scale * v for v in log[column]], marker=".", color=colours[label], label=label)
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0.0, 100.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no fractional steps on short runs
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
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
