"""The labelled configuration every reader returns.

Units everywhere in sparse_eqv: Å, eV, eV/Å, eV/Å^3 (stress, ASE sign
convention: positive under tension), μB.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Frame:
    """One atomic configuration with optional DFT labels.

    Attributes:
        numbers: (N,) int atomic numbers.
        positions: (N, 3) float64 Cartesian positions, Å.
        cell: (3, 3) float64 lattice vectors as rows, Å (zeros if not periodic).
        pbc: (3,) bool periodicity per lattice direction.
        energy: total energy, eV, or None.
        forces: (N, 3) eV/Å, or None.
        stress: (3, 3) eV/Å^3 (ASE sign), or None.
        magmoms: (N,) or (N, 3) magnetic moments, μB, or None.
        source: "file:index" naming where the frame came from, for errors.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    magmoms: np.ndarray | None = None
    source: str = "<memory>"

    @property
    def num_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @property
    def periodic(self) -> bool:
        return bool(np.any(self.pbc))

    def to_atoms(self):
        """The frame as an `ase.Atoms` (labels not attached)."""
        import ase

        return ase.Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
