"""What a fine-tuned model kept and lost: the run against its base model.

Three checks, each comparing the run's best epoch ("fine-tuned") with the
model it started from ("base", run.json's "model"):

- Data sets (`data_check`): on each file, the errors of both against the
  labels where there are labels (raw and after a per-element E0 fit, as
  `sparse-eqv evaluate`), and the label-free drift of the fine-tuned
  predictions from the base's: energy in meV/atom after a per-element offset
  (a change of reference, not of physics), forces in meV/Å.
- Dimers (`dimer_curve`): for each pair of elements of the training data,
  E(r) - E(isolated atoms) from 0.5 Å to r_max, eV. A curve has a *hole*
  when, moving inward from its bonding well (the outermost local minimum
  deeper than WELL_DEPTH_EV), the energy falls by more than HOLE_TOLERANCE_EV
  anywhere, or when its lowest point is the innermost one.
- MD (`md_check`): a Langevin run from a frame; the smallest pair distance
  (Å), the largest force (eV/Å) and whether the run stayed physical (finite
  predictions, no pair closer than half the starting minimum or
  MIN_PHYSICAL_DISTANCE).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Sequence

import ase
import ase.data
import numpy as np

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.calculator import Calculator
from sparse_eqv.checkpoint import load_for_inference
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.readers import read_frames
from sparse_eqv.errors import SparseEqvError
from sparse_eqv.finetune.e0s import composition
from sparse_eqv.finetune.evaluate import prediction_metrics
from sparse_eqv.inference import Predictor

DIMER_START = 0.5  # Å, innermost distance of a dimer curve
DIMER_STEP = 0.02  # Å
HOLE_TOLERANCE_EV = 0.01  # energy drop moving inward from the well that counts as a hole
WELL_DEPTH_EV = 0.1  # a local minimum this far below the isolated atoms is a bond's well
WALL_HEIGHT_EV = 1.0  # the repulsive wall is where E(r) - E(isolated) first reaches this, moving inward
MIN_PHYSICAL_DISTANCE = 0.5  # Å: an MD run with a pair closer than this did not stay physical


def _symbol(z: int) -> str:
    return ase.data.chemical_symbols[int(z)]


class RunModels:
    """The base and fine-tuned predictors of a run directory, and what the run recorded.

    Attributes:
        run_dir, info (run.json), base, finetuned (Predictor), e0_shift
        (eV per element of the model's table, the run's fitted shift),
        elements (atomic numbers of the training data).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        run_json = self.run_dir / "run.json"
        if not run_json.is_file():
            raise SparseEqvError(f"{self.run_dir}: not a fine-tuning run directory (no run.json)")
        self.info = json.loads(run_json.read_text())
        base_dir = Path(self.info["model"])
        if not base_dir.exists():
            raise SparseEqvError(f"{run_json}: its base model {base_dir} is not there any more")
        self.base = Predictor(*load_for_inference(base_dir))
        self.finetuned = Predictor(*load_for_inference(self.run_dir))
        numbers = self.finetuned.atomic_numbers
        shift = self.info.get("e0_shift_eV", {})
        self.e0_shift = np.array([shift.get(str(z), 0.0) for z in numbers])
        self.elements = self._training_elements()

    def _training_elements(self) -> list[int]:
        if "elements" in self.info:
            return [int(z) for z in self.info["elements"]]
        train = Path(self.info["data"]["train"])  # runs written before run.json recorded the elements
        if not train.exists():
            raise SparseEqvError(f"{self.run_dir}/run.json: names training data {train}, which is not there any more")
        return sorted({int(z) for frame in read_frames(train) for z in frame.numbers})


def _drift(frames: Sequence[Frame], base: Sequence[dict], tuned: Sequence[dict], atomic_numbers: Sequence[int],
           run_shift: np.ndarray) -> dict:
    """Mean absolute change of the predictions: energy meV/atom with the run's
    E0 shift (eV per element) removed ("energy_mae") and after a least-squares
    per-element offset fitted to the change itself ("energy_mae_e0_fit", as
    `evaluate`'s e0_fit errors), forces meV/Å."""
    atoms = np.array([f.num_atoms for f in frames], float)
    counts = composition(frames, atomic_numbers)
    change = np.array([t["energy"] - b["energy"] for b, t in zip(base, tuned)])
    present = counts.sum(axis=0) > 0
    offset = np.linalg.lstsq(counts[:, present], change, rcond=None)[0]
    aligned = change - counts[:, present] @ offset
    forces = np.concatenate([np.abs(t["forces"] - b["forces"]).reshape(-1) for b, t in zip(base, tuned)])
    return {"energy_mae": float(1e3 * np.mean(np.abs(change - counts @ run_shift) / atoms)),
            "energy_mae_e0_fit": float(1e3 * np.mean(np.abs(aligned) / atoms)),
            "forces_mae": float(1e3 * forces.mean()), "n_frames": len(frames)}


def data_check(models: RunModels, path: str | Path, read_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Errors of base and fine-tuned on the labels of `path` (where it has them),
    and the drift between the two (see module docstring)."""
    frames = read_frames(path, **(read_options or {}))
    base = models.base.predict(frames)
    tuned = models.finetuned.predict(frames)
    drift = _drift(frames, base, tuned, models.finetuned.atomic_numbers, models.e0_shift)
    out: dict[str, Any] = {"data": str(path), "n_frames": len(frames), "drift": drift}
    if any(f.energy is not None or f.forces is not None for f in frames):
        out["base"] = prediction_metrics(frames, base, models.base.atomic_numbers)
        out["finetuned"] = prediction_metrics(frames, tuned, models.finetuned.atomic_numbers)
    return out


def _dimer_frames(za: int, zb: int, distances: np.ndarray) -> list[Frame]:
    return [
        Frame(numbers=np.array([za, zb]), positions=np.array([[0.0, 0.0, 0.0], [0.0, 0.0, r]]), cell=np.zeros((3, 3)),
              pbc=np.zeros(3, bool), source=f"dimer {_symbol(za)}-{_symbol(zb)} at {r:.2f} Å")
        for r in distances
    ]


def curve_features(distances: np.ndarray, energies: np.ndarray) -> dict[str, Any]:
    """The bonding well, repulsive wall and hole of a binding curve.

    Args:
        distances: (R,) increasing, Å. energies: (R,) E(r) - E(isolated), eV.

    Returns:
        r_min (Å), e_min (eV): the lowest point; well_r, well_e: the outermost
        local minimum at least WELL_DEPTH_EV deep (the bond; r_max when the
        curve has none); wall_r: the largest r inside the well where the energy
        reaches WALL_HEIGHT_EV (None: never); hole_depth (eV): the largest
        drop of energy moving inward from the well (inf when the lowest point
        is the innermost one); hole: depth above HOLE_TOLERANCE_EV.
    """
    e = energies
    wells = [i for i in range(1, len(e) - 1) if e[i] <= e[i - 1] and e[i] <= e[i + 1] and e[i] < -WELL_DEPTH_EV]
    k = wells[-1] if wells else len(e) - 1
    inner_e = e[: k + 1][::-1]  # from the well inward
    inner_r = distances[: k + 1][::-1]
    lowest = int(np.argmin(e))
    depth = float("inf") if lowest == 0 else float(np.max(np.maximum.accumulate(inner_e) - inner_e))
    above = np.nonzero(inner_e >= WALL_HEIGHT_EV)[0]
    return {
        "r_min": float(distances[lowest]),
        "e_min": float(e[lowest]),
        "well_r": float(distances[k]),
        "well_e": float(e[k]),
        "wall_r": float(inner_r[above[0]]) if above.size else None,
        "hole_depth": depth,
        "hole": depth > HOLE_TOLERANCE_EV,
    }


def dimer_curve(models: RunModels, za: int, zb: int) -> dict[str, Any]:
    """Binding curves E(r) - E(isolated) (eV) of the pair (za, zb) for base and
    fine-tuned from DIMER_START to r_max, with `curve_features` of each."""
    r_max = models.finetuned.cutoff
    distances = np.arange(DIMER_START, r_max + 1e-9, DIMER_STEP)
    frames = _dimer_frames(za, zb, np.append(distances, r_max + 1.0))  # the last: beyond the cutoff, isolated atoms
    out: dict[str, Any] = {"pair": f"{_symbol(za)}-{_symbol(zb)}", "r": distances.tolist()}
    for name, predictor in (("base", models.base), ("finetuned", models.finetuned)):
        energies = np.array([p["energy"] for p in predictor.predict(frames)])
        curve = energies[:-1] - energies[-1]
        out[name] = {"energy": curve.tolist(), **curve_features(distances, curve)}
    out["new_hole"] = out["finetuned"]["hole"] and not out["base"]["hole"]
    return out


def element_pairs(elements: Sequence[int]) -> list[tuple[int, int]]:
    """Every unordered pair of the elements, like pairs included."""
    return list(itertools.combinations_with_replacement(sorted(elements), 2))


def _min_distance(atoms: ase.Atoms) -> float:
    if len(atoms) < 2:
        return float("inf")
    distances = atoms.get_all_distances(mic=bool(np.any(atoms.pbc)))
    return float(distances[np.triu_indices(len(atoms), 1)].min())


def md_check(path: str | Path, frame: Frame, *, steps: int, temperature: float, timestep_fs: float = 1.0,
             seed: int = 0) -> dict[str, Any]:
    """A Langevin run (friction 0.01/fs) of `steps` steps from `frame` with the
    model or run at `path`: smallest pair distance (Å) and largest force
    (eV/Å) over the run, and whether it stayed physical."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = frame.to_atoms()
    atoms.calc = Calculator(path)
    thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    start = _min_distance(atoms)
    floor = max(MIN_PHYSICAL_DISTANCE, 0.5 * start)
    record = {"min_distance": start, "max_force": 0.0, "steps_done": 0, "failure": None}

    def observe():
        forces = atoms.get_forces()
        distance = _min_distance(atoms)
        record["min_distance"] = min(record["min_distance"], distance)
        if not (np.all(np.isfinite(forces)) and np.isfinite(atoms.get_potential_energy())):
            raise FloatingPointError("non-finite energy or forces")
        record["max_force"] = max(record["max_force"], float(np.linalg.norm(forces, axis=1).max()))
        if distance < floor:
            raise FloatingPointError(f"two atoms came {distance:.2f} Å apart (started {start:.2f} Å)")

    dynamics = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature, friction=0.01 / units.fs,
                        fixcm=False, rng=np.random.default_rng(seed))
    try:
        observe()
        for _ in range(steps):
            dynamics.run(1)
            observe()
            record["steps_done"] += 1
    except (FloatingPointError, SparseEqvError) as error:
        record["failure"] = str(error)
    record["physical"] = record["failure"] is None
    return {"frame": frame.source, "start_min_distance": start, **record}


def dimer_figure(curves: Sequence[dict[str, Any]], title: str):
    """One panel per pair: base (dashed) and fine-tuned (solid) binding curves, eV against Å."""
    from matplotlib.figure import Figure

    columns = min(4, len(curves))
    rows = -(-len(curves) // columns)
    figure = Figure(figsize=(3.6 * columns, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
    for ax, curve in zip(axes, curves):
        for name, style in (("base", "--"), ("finetuned", "-")):
            ax.plot(curve["r"], curve[name]["energy"], style, label=name + (" (hole)" if curve[name]["hole"] else ""))
        lowest = min(min(curve["base"]["energy"]), min(curve["finetuned"]["energy"]))
        ax.set_ylim(max(lowest, -10.0) - 0.5, 10.0)
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_title(curve["pair"] + ("  NEW HOLE" if curve["new_hole"] else ""), fontsize=10,
                     color="red" if curve["new_hole"] else "black")
        ax.set_xlabel("distance (Å)")
        ax.set_ylabel("E - E(isolated) (eV)")
        ax.legend(fontsize=7)
    for ax in axes[len(curves):]:
        ax.set_visible(False)
    figure.suptitle(title)
    return figure


def robustness(run_dir: str | Path, data: Sequence[str | Path], *, out_dir: str | Path | None = None,
               md_steps: int = 0, md_frames: int = 2, temperature: float = 300.0,
               read_options: dict[str, str] | None = None, progress=print) -> dict[str, Any]:
    """All three checks of a run; writes OUT_DIR/dimers.png (default RUN_DIR/robustness)
    and returns everything (the command's JSON)."""
    models = RunModels(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else models.run_dir / "robustness"
    result: dict[str, Any] = {"run": str(models.run_dir), "base": models.info["model"],
                              "elements": [_symbol(z) for z in models.elements], "data": [], "dimers": [], "md": []}
    for path in data:
        progress(f"data {path}")
        result["data"].append(data_check(models, path, read_options))
    for za, zb in element_pairs(models.elements):
        result["dimers"].append(dimer_curve(models, za, zb))
    figure = dimer_figure(result["dimers"], f"{models.run_dir.name}: dimer curves, base vs fine-tuned")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "dimers.png") as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    result["figures"] = [str(out_dir / "dimers.png")]
    if md_steps > 0:
        for path in data:
            for frame in read_frames(path, **(read_options or {}))[:md_frames]:
                progress(f"md {frame.source}: {md_steps} steps at {temperature} K")
                result["md"].append({
                    "base": md_check(models.info["model"], frame, steps=md_steps, temperature=temperature),
                    "finetuned": md_check(models.run_dir, frame, steps=md_steps, temperature=temperature),
                })
    return result


def _num(value, fmt=".1f") -> str:
    return "-" if value is None else format(value, fmt)


def format_result(result: dict[str, Any]) -> str:
    """The terminal tables: data sets, dimers, MD."""
    lines = [f"run {result['run']} (base {result['base']}; training elements {' '.join(result['elements'])})", "",
             "data set                         frames  F MAE base  F MAE tuned  E MAE base  E MAE tuned  "
             "drift E  drift F",
             "                                         (meV/Å)     (meV/Å)      (meV/at,E0) (meV/at,E0)  (E0 fit) (meV/Å)"]
    for entry in result["data"]:
        name = Path(entry["data"]).name[-32:]
        base, tuned = entry.get("base", {}), entry.get("finetuned", {})
        e_base = base.get("e0_fit", {}).get("energy_mae")
        e_tuned = tuned.get("e0_fit", {}).get("energy_mae")
        lines.append(
            f"{name:<32} {entry['n_frames']:>6}  {_num(base.get('raw', {}).get('forces_mae')):>10}  "
            f"{_num(tuned.get('raw', {}).get('forces_mae')):>11}  {_num(e_base):>10}  {_num(e_tuned):>11}  "
            f"{_num(entry['drift']['energy_mae_e0_fit']):>7}  {_num(entry['drift']['forces_mae']):>7}"
        )
    lines += ["", "dimer   well r base/tuned (Å)  well E base/tuned (eV)  wall(1 eV) base/tuned (Å)  hole base/tuned"]
    for d in result["dimers"]:
        b, t = d["base"], d["finetuned"]
        flag = "  <- NEW HOLE" if d["new_hole"] else ""
        lines.append(
            f"{d['pair']:<7} {b['well_r']:>6.2f} / {t['well_r']:<6.2f}       {b['well_e']:>7.2f} / {t['well_e']:<7.2f}      "
            f"{_num(b['wall_r'], '.2f'):>5} / {_num(t['wall_r'], '.2f'):<5}              "
            f"{'yes' if b['hole'] else 'no':>3} / {'yes' if t['hole'] else 'no'}{flag}"
        )
    if result["md"]:
        lines += ["", "MD from            model      steps  min dist (Å)  max |F| (eV/Å)  physical"]
        for pair in result["md"]:
            for name in ("base", "finetuned"):
                m = pair[name]
                lines.append(f"{m['frame'][-18:]:<18} {name:<10} {m['steps_done']:>5}  {m['min_distance']:>12.2f}  "
                             f"{m['max_force']:>14.2f}  {'yes' if m['physical'] else 'NO: ' + m['failure']}")
    new_holes = [d["pair"] for d in result["dimers"] if d["new_hole"]]
    lines += ["", f"fine-tuning opened a short-range hole in: {', '.join(new_holes)}" if new_holes
              else "no dimer curve gained a short-range hole"]
    return "\n".join(lines) + "\n"
