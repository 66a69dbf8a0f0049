"""Deployment checks: an exported checkpoint goes through its package's LAMMPS deploy step, and the
deployed TorchScript file predicts what `sparse-eqv predict` predicts.

- MACE: `mace_create_lammps_model OUT.model --dtype float64` (.venv-mace), evaluated the way
  `pair_style mace` calls it, with and without domain decomposition
  (tests/torch_ref/lammps_mace_reference.py): float64, 1e-8 eV/atom.
- SevenNet: `sevenn_get_model OUT.pth` (serial), evaluated the way `pair_style e3gnn` calls it
  (tests/torch_ref/lammps_sevenn_reference.py). sevenn freezes its float32 weights into the
  TorchScript file and pair_e3gnn feeds float32 edge vectors, so the deployed model runs in float32:
  the agreement is float32's, not float64's.

Each run stands in for a fine-tuning run (run.json + model/, as `finetune` writes them) whose model
has a tenth of the entries of every weight tensor changed, so the deployed file must carry the
fine-tuned weights, not the base's. Tiny models: a reduced MACE-OFF23-small (built by mace-torch) and a
two-layer Cu/Ni SevenNet (built by sevenn).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.geometry import get_distances

from sparse_eqv.checkpoint import load_for_inference, load_model, save_model
from sparse_eqv.cli import main
from sparse_eqv.data.readers import read_frames
from sparse_eqv.inference import Predictor
from sparse_eqv.testing import perturb_mapped_weights, write_stand_in_run
from weights_convert.convert import convert
from weights_convert.export import export_run

TORCH_REF = Path(__file__).resolve().parents[1] / "torch_ref"
MACE_TOL = {"energy_per_atom": 1e-8, "forces": 1e-7, "stress": 1e-8}  # eV/atom, eV/Å, eV/Å^3
# float32 (deployed SevenNet) against float64 (ours): float32 round-off of a two-layer network.
SEVENN_TOL = {"energy_per_atom": 1e-6, "forces": 1e-6, "stress": 1e-7}


def _exported(tmp_path: Path, checkpoint: Path, suffix: str, seed: int) -> tuple[Path, Path, tuple]:
    """(run dir, its exported checkpoint, (config, variables) of the base) for `checkpoint`."""
    config, variables = convert(checkpoint)
    save_model(tmp_path / "base", config, variables)
    config, variables = load_model(tmp_path / "base")
    nudged, _ = perturb_mapped_weights(config, variables, seed=seed, n_entries=lambda size: max(1, size // 10), scale=0.1)
    run = write_stand_in_run(tmp_path / "run", tmp_path / "base", config, nudged)
    exported = tmp_path / f"finetuned{suffix}"
    assert export_run(run, exported)["nnz"] > 0
    return run, exported, (config, variables)


def _random_periodic(symbols: list[str], cell: np.ndarray, min_distance: float, seed: int) -> ase.Atoms:
    """Atoms at random positions in a periodic cell, no two closer than `min_distance` Å."""
    rng = np.random.default_rng(seed)
    positions: list[np.ndarray] = []
    while len(positions) < len(symbols):
        trial = rng.random(3) @ cell
        if not positions or get_distances(trial, positions, cell=cell, pbc=True)[1].min() >= min_distance:
            positions.append(trial)
    return ase.Atoms(symbols, positions=positions, cell=cell, pbc=True)


def _predict_cli(run: Path, frames: Path, tmp_path: Path) -> list[dict]:
    """`sparse-eqv predict RUN --data FRAMES`, read back from its extxyz (forces there have 8 decimals)."""
    out = tmp_path / "predicted.extxyz"
    assert main(["predict", str(run), "--data", str(frames), "-o", str(out), "--quiet"]) == 0
    return [{"energy": a.get_potential_energy(), "forces": a.get_forces(), "stress": a.get_stress(voigt=False)}
            for a in ase.io.read(out, ":")]


def _predict(model: tuple, frames: Path) -> list[dict]:
    """What `sparse-eqv predict` computes (`Predictor`), in full precision; the same batch as the CLI's
    call, so nothing new is compiled."""
    return Predictor(*model).predict(read_frames(frames))


def _lammps(npz: Path, mode: str, frames: Path) -> list[dict]:
    """Per-frame predictions from a lammps_*_reference.py output file."""
    data, sizes = np.load(npz), [len(a) for a in ase.io.read(frames, ":")]
    forces = np.split(data[f"{mode}forces"], np.cumsum(sizes)[:-1])
    return [{"energy": data[f"{mode}energy"][k], "forces": forces[k], "stress": data[f"{mode}stress"][k]}
            for k in range(len(sizes))]


def _deviations(ours: list[dict], theirs: list[dict]) -> dict[str, float]:
    """Largest |Δ| over the frames: energy per atom (eV/atom), force component (eV/Å), stress (eV/Å^3)."""
    return {
        "energy_per_atom": max(abs(a["energy"] - b["energy"]) / len(a["forces"]) for a, b in zip(ours, theirs)),
        "forces": max(np.abs(a["forces"] - b["forces"]).max() for a, b in zip(ours, theirs)),
        "stress": max(np.abs(np.asarray(a["stress"]) - b["stress"]).max() for a, b in zip(ours, theirs)),
    }


def _check(run: Path, base: tuple, frames: Path, deployed: dict[str, list[dict]], tol: dict, tmp_path: Path) -> None:
    """Each deployed model's predictions against ours (`Predictor` and the CLI's file) within `tol`;
    the run's changes must move ours by far more than `tol`."""
    ours = {"sparse-eqv predict": _predict(load_for_inference(run), frames),
            "its extxyz": _predict_cli(run, frames, tmp_path)}
    moved = _deviations(ours["sparse-eqv predict"], _predict(base, frames))
    print("the run's changes move our predictions by " + ", ".join(f"{k} {v:.1e}" for k, v in moved.items()))
    for key, limit in tol.items():
        assert moved[key] > 100 * limit, ("the changes are too small to be seen", key, moved)
    for label, theirs in deployed.items():
        for name, predicted in ours.items():
            dev = _deviations(predicted, theirs)
            print(f"{label} vs {name}: " + ", ".join(f"max |Δ{k}| {v:.1e}" for k, v in dev.items()))
            for key, limit in tol.items():
                assert dev[key] <= limit, (label, name, key, dev)


def _run(command: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def test_mace_lammps_model_predicts_what_we_predict(tmp_path, small_mace_model, mace_python):
    create = mace_python.parent / "mace_create_lammps_model"
    if not create.exists():
        pytest.skip(f"{create} missing: mace-torch in .venv-mace has no create_lammps_model entry point")
    run, exported, base = _exported(tmp_path, small_mace_model, ".model", seed=1)
    frames = tmp_path / "frames.extxyz"
    ase.io.write(frames, [
        _random_periodic(list("CCCCCCHHHHHHHHNNOO") * 2, np.diag([7.5, 8.0, 8.5]), 1.0, seed=0),
        _random_periodic(list("CCCCHHHHHHNNOOFS") * 2, np.array([[7.0, 0.0, 0.0], [1.5, 7.2, 0.0], [-1.0, 0.8, 7.4]]),
                         1.0, seed=1),
    ], format="extxyz")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "OMP_NUM_THREADS": "2"}
    _run([str(create), str(exported), "--dtype", "float64"], env=env)
    deployed = Path(f"{exported}-lammps.pt")
    assert deployed.is_file()
    out = tmp_path / "lammps.npz"
    _run([str(mace_python), str(TORCH_REF / "lammps_mace_reference.py"), str(deployed), str(frames), str(out)], env=env)
    deployed_predictions = {
        "MACE, pair_style mace no_domain_decomposition": _lammps(out, "nodd_", frames),
        "MACE, pair_style mace (domain decomposition)": _lammps(out, "dd_", frames),
    }
    _check(run, base, frames, deployed_predictions, MACE_TOL, tmp_path)


def test_sevenn_deployed_model_predicts_what_we_predict(tmp_path):
    pytest.importorskip("sevenn")
    from sparse_eqv.testing import tiny_cuni_checkpoint_config, write_sevenn_checkpoint

    get_model = Path(sys.executable).parent / "sevenn_get_model"
    if not get_model.exists():
        pytest.skip(f"{get_model} missing: sevenn's deploy command is not installed in this environment")
    checkpoint = write_sevenn_checkpoint(tmp_path / "tiny.pth", tiny_cuni_checkpoint_config(), seed=4)
    run, exported, base = _exported(tmp_path, checkpoint, ".pth", seed=2)
    rng = np.random.default_rng(3)
    first = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    second = bulk("Cu", "fcc", a=3.55)  # a skewed primitive cell, 2x2x1: atoms see images of themselves
    second.set_cell(second.cell.array @ np.array([[1.02, 0.01, 0.0], [0.0, 0.99, 0.02], [0.0, 0.0, 1.01]]),
                    scale_atoms=True)
    second = second * (2, 2, 1)
    for atoms in (first, second):
        atoms.symbols[rng.random(len(atoms)) < 0.4] = "Ni"
        atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
    frames = tmp_path / "frames.extxyz"
    ase.io.write(frames, [first, second], format="extxyz")
    _run([str(get_model), str(exported), "-o", str(tmp_path / "deployed")], cwd=tmp_path)
    deployed = tmp_path / "deployed.pt"
    assert deployed.is_file()
    out = tmp_path / "lammps.npz"
    _run([sys.executable, str(TORCH_REF / "lammps_sevenn_reference.py"), str(deployed), str(frames), str(out)])
    _check(run, base, frames, {"SevenNet, pair_style e3gnn (float32)": _lammps(out, "", frames)}, SEVENN_TOL, tmp_path)
