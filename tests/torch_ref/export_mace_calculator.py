"""Evaluate a MACE `.model` file the way a mace-torch user does: `MACECalculator`.

Run with `.venv-mace/bin/python`:

    export_mace_calculator.py MODEL FRAMES.extxyz OUT.npz

Writes energy (G,) eV, forces (sum N, 3) eV/Å, stress (G, 3, 3) eV/Å^3 (ASE
sign) in float64.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase.stress import voigt_6_to_full_3x3_stress  # noqa: E402
from mace.calculators import MACECalculator  # noqa: E402


def main() -> None:
    model, frames, out = sys.argv[1:4]
    calculator = MACECalculator(model_paths=model, device="cpu", default_dtype="float64")
    energies, forces, stresses = [], [], []
    for atoms in ase.io.read(frames, ":"):
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        stresses.append(voigt_6_to_full_3x3_stress(atoms.get_stress()) if atoms.pbc.any() else np.zeros((3, 3)))
    np.savez(out, energy=np.array(energies), forces=np.concatenate(forces), stress=np.array(stresses))


if __name__ == "__main__":
    main()
