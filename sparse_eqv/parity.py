"""Parity plots of a model's predictions against a data set's labels
(`sparse-eqv evaluate MODEL --data FILE --plot DIR`).

One PNG per labelled quantity in DIR: energy per atom (eV/atom), force
components (eV/Å) and, where periodic frames carry a stress label, stress
components (eV/Å^3, ASE sign). Each figure has two panels: predicted against
reference with the line y = x, MAE and RMSE in the legend; and the histogram
of the errors (predicted - reference). The errors are in the units
`evaluate` prints (meV/atom, meV/Å, meV/Å^3) and pooled as `evaluate` pools
them, so the legend's MAE is the one `evaluate` reports. The energy figure
shows the raw predictions and, beside them, the predictions after the
per-element E0 shift `evaluate` fitted ("after E0 fit"; forces and stress do
not depend on it). DIR/parity.json holds every number of the legends.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import ase.data
import numpy as np

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.data.frames import Frame
from sparse_eqv.errors import SparseEqvError

SUMMARY_FILE = "parity.json"


@dataclasses.dataclass(frozen=True)
class Quantity:
    """How one labelled quantity is drawn: its PNG, the axis label and unit,
    and the unit of its errors (1000 of the axis unit)."""

    file: str
    label: str
    unit: str
    error_unit: str


QUANTITIES = {
    "energy": Quantity("parity_energy.png", "energy per atom", "eV/atom", "meV/atom"),
    "forces": Quantity("parity_forces.png", "force components", "eV/Å", "meV/Å"),
    "stress": Quantity("parity_stress.png", "stress components", "eV/Å³", "meV/Å³"),
}
# The series' names are those of `evaluate`'s metric sets.
SERIES_LABELS = {"raw": "raw", "e0_fit": "after E0 fit"}


@dataclasses.dataclass(frozen=True)
class Series:
    """Reference and predicted values of one quantity, in its axis unit
    (eV/atom, eV/Å or eV/Å^3), flattened as `evaluate` pools them."""

    name: str
    reference: np.ndarray
    predicted: np.ndarray

    @property
    def errors(self) -> np.ndarray:
        """predicted - reference, in the error unit (meV/atom, meV/Å, meV/Å^3)."""
        return 1e3 * (self.predicted - self.reference)

    @property
    def mae(self) -> float:
        return float(np.mean(np.abs(self.errors)))

    @property
    def rmse(self) -> float:
        return float(np.sqrt(np.mean(self.errors**2)))

    def legend(self, quantity: Quantity) -> str:
        return (f"{SERIES_LABELS[self.name]}: MAE {self.mae:.3f}, RMSE {self.rmse:.3f} {quantity.error_unit} "
                f"(n = {self.reference.size})")


def parity_series(frames: Sequence[Frame], predictions: Sequence[dict[str, np.ndarray]],
                  e0_shift_eV: dict[str, float] | None = None) -> dict[str, list[Series]]:
    """The series of every quantity some frame is labelled with: "energy"
    (per atom; "raw", and "e0_fit" when `e0_shift_eV`, eV per element symbol as
    `evaluate` reports it, is given), "forces" and "stress" (periodic frames) ("raw")."""
    energy = [(f, p) for f, p in zip(frames, predictions) if f.energy is not None]
    forces = [(f, p) for f, p in zip(frames, predictions) if f.forces is not None]
    stress = [(f, p) for f, p in zip(frames, predictions) if f.stress is not None and f.periodic]
    out: dict[str, list[Series]] = {}
    if energy:
        reference = np.array([f.energy / f.num_atoms for f, _ in energy])
        predicted = np.array([p["energy"] / f.num_atoms for f, p in energy])
        out["energy"] = [Series("raw", reference, predicted)]
        if e0_shift_eV is not None:
            shift = np.array([sum(e0_shift_eV.get(ase.data.chemical_symbols[z], 0.0) for z in f.numbers) / f.num_atoms
                              for f, _ in energy])
            out["energy"].append(Series("e0_fit", reference, predicted + shift))
    if forces:
        out["forces"] = [Series("raw", np.concatenate([np.ravel(f.forces) for f, _ in forces]),
                                np.concatenate([np.ravel(p["forces"]) for _, p in forces]))]
    if stress:
        out["stress"] = [Series("raw", np.concatenate([np.ravel(f.stress) for f, _ in stress]),
                                np.concatenate([np.ravel(p["stress"]) for _, p in stress]))]
    return out


def parity_figure(quantity: Quantity, series: Sequence[Series], title: str):
    """A matplotlib Figure: predicted vs reference (left, y = x dashed, the
    legend with MAE and RMSE) and the error histogram (right), one colour per series."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11.0, 4.8), layout="constrained")
    parity, histogram = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.15]})
    values = np.concatenate([np.concatenate([s.reference, s.predicted]) for s in series])
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low) if high > low else max(abs(low), 1.0) * 0.05
    limits = (low - pad, high + pad)
    parity.plot(limits, limits, color="0.4", linestyle="--", linewidth=1.0, label="y = x")
    marker_size = 12.0 if max(s.reference.size for s in series) < 1000 else 3.0
    for colour, s in zip(("C0", "C1"), series):
        parity.scatter(s.reference, s.predicted, s=marker_size, alpha=0.6, color=colour, edgecolors="none",
                       rasterized=True, label=s.legend(quantity))
    parity.set_xlim(limits)
    parity.set_ylim(limits)
    parity.set_aspect("equal")
    parity.xaxis.set_major_locator(MaxNLocator(6))
    parity.yaxis.set_major_locator(MaxNLocator(6))
    parity.set_xlabel(f"reference {quantity.label} ({quantity.unit})")
    parity.set_ylabel(f"predicted {quantity.label} ({quantity.unit})")
    parity.grid(True, alpha=0.3)
    parity.legend(loc="upper left", fontsize=8)

    errors = np.concatenate([s.errors for s in series])
    edges = np.histogram_bin_edges(errors, bins=int(np.clip(2.0 * np.sqrt(errors.size), 10, 60)))
    for colour, s in zip(("C0", "C1"), series):
        histogram.hist(s.errors, bins=edges, color=colour, alpha=0.5, label=SERIES_LABELS[s.name])
    histogram.axvline(0.0, color="0.4", linestyle="--", linewidth=1.0)
    histogram.set_xlabel(f"error, predicted − reference ({quantity.error_unit})")
    histogram.set_ylabel("count")
    histogram.yaxis.set_major_locator(MaxNLocator(integer=True))
    histogram.grid(True, alpha=0.3)
    histogram.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def write_parity_plots(out_dir: str | Path, frames: Sequence[Frame], predictions: Sequence[dict[str, np.ndarray]], *,
                       e0_shift_eV: dict[str, float] | None, title: str, data: str | Path) -> list[Path]:
    """Draw `parity_figure` for every labelled quantity into `out_dir` (one PNG
    each, QUANTITIES' file names) and write out_dir/parity.json: per quantity
    and series, MAE and RMSE (the error unit), n (values pooled) and the legend
    line; each file atomically. Returns the PNG paths. SparseEqvError naming
    `data` (the file the frames came from) when no frame carries a label."""
    out_dir = Path(out_dir)
    series = parity_series(frames, predictions, e0_shift_eV)
    if not series:
        raise SparseEqvError(f"{data}: no energy, force or stress labels to plot")
    summary: dict[str, Any] = {"title": title, "figures": {}}
    figures = []
    for name, items in series.items():
        quantity = QUANTITIES[name]
        figure = parity_figure(quantity, items, f"{title}: {quantity.label}")
        path = out_dir / quantity.file
        with atomic_file(path) as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        figures.append(path)
        summary["figures"][name] = str(path)
        summary[name] = {s.name: {"mae": s.mae, "rmse": s.rmse, "unit": quantity.error_unit, "n": int(s.reference.size),
                                  "legend": s.legend(quantity)} for s in items}
    with atomic_file(out_dir / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return figures
