"""A small Cu/Ni data set labelled by ASE's EMT potential, for the demo.

EMT is a cheap analytic model, not DFT: moving a PBE-trained foundation model
onto EMT labels is a change of reference (like moving it to another
functional), which is what fine-tuning on a user's own data does.

Every frame has 7 or 8 atoms (with SevenNet-0's 5 Å cutoff about 40
neighbours each), so that one padding budget fits any batch and a CPU
training step takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT

from sparse_eqv.atomic_write import atomic_file

LEVEL_OF_THEORY = "EMT (ase.calculators.emt), not DFT"
KINDS = ("bulk", "alloy", "vacancy", "surface")
_SHARES = (0.45, 0.25, 0.15, 0.15)


def _labelled(atoms: Atoms, kind: str) -> Atoms:
    atoms.calc = EMT()
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
    atoms.calc = None
    atoms.info.update({"energy": energy, "stress": stress, "config_type": kind, "level_of_theory": LEVEL_OF_THEORY})
    atoms.arrays["forces"] = forces
    return atoms


def _strained(atoms: Atoms, rng: np.random.Generator, strain: float, rattle: float) -> Atoms:
    atoms = atoms.copy()
    epsilon = rng.uniform(-strain, strain, (3, 3))
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (epsilon + epsilon.T)), scale_atoms=True)
    atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
    return atoms


def emt_frames(n_frames: int = 200, seed: int = 0) -> list[Atoms]:
    """Rattled, strained fcc Cu and Cu/Ni cells, a vacancy and a (111) surface.

    Bulk and alloy: 8-atom cells (two cubic fcc cells), up to 2 % strain and
    0.01-0.08 Å rattle; vacancy: the same cell less one atom; surface: a
    4-layer Cu(111) slab of 8 atoms with 6 Å of vacuum, rattled.

    Returns `n_frames` labelled Atoms (energy eV and stress eV/Å^3 in info,
    forces eV/Å in arrays, `config_type` the kind), shuffled, fixed for a seed.
    """
    rng = np.random.default_rng(seed)
    cu = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    vacancy = cu.copy()
    del vacancy[0]
    surface = fcc111("Cu", size=(1, 2, 4), vacuum=6.0, periodic=True)
    surface.info.clear()
    bounds = np.cumsum(_SHARES)
    frames = []
    for index in range(n_frames):
        kind = KINDS[int(np.searchsorted(bounds, (index + 0.5) / n_frames))]
        if kind == "bulk":
            atoms = _strained(cu, rng, 0.02, rng.uniform(0.01, 0.08))
        elif kind == "alloy":
            atoms = _strained(cu, rng, 0.02, rng.uniform(0.01, 0.07))
            atoms.numbers[rng.random(len(atoms)) < rng.uniform(0.2, 0.5)] = 28
        elif kind == "vacancy":
            atoms = _strained(vacancy, rng, 0.02, rng.uniform(0.01, 0.07))
        else:
            atoms = surface.copy()
            atoms.positions += rng.normal(0.0, rng.uniform(0.01, 0.06), atoms.positions.shape)
        frames.append(_labelled(atoms, kind))
    order = rng.permutation(n_frames)
    return [frames[i] for i in order]


def write_emt_dataset(directory: str | Path, n_frames: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write train/valid/test extxyz files (70/15/15 %) once; reuse them afterwards."""
    directory = Path(directory)
    paths = {split: directory / f"emt_cuni_{split}.extxyz" for split in ("train", "valid", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    frames = emt_frames(n_frames, seed)
    n_train, n_valid = int(0.7 * n_frames), int(0.15 * n_frames)
    splits = {
        "train": frames[:n_train],
        "valid": frames[n_train : n_train + n_valid],
        "test": frames[n_train + n_valid :],
    }
    for split, images in splits.items():
        with atomic_file(paths[split]) as tmp:
            ase.io.write(tmp, images, format="extxyz")
    return paths
