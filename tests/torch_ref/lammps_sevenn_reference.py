"""What LAMMPS's `pair_style e3gnn` computes with a model deployed by `sevenn_get_model` (serial).

Run with the sparse_eqv environment's python (sevenn 0.13, torch):

    lammps_sevenn_reference.py DEPLOYED.pt FRAMES.extxyz OUT.npz

Loads the TorchScript file with `torch.jit.load` and calls it with the inputs
pair_e3gnn.cpp (shipped in sevenn/pair_e3gnn) builds: `x` the type index of
each local atom (its place in the file's `chemical_symbols_to_index`, which is
what `pair_coeff * * DEPLOYED.pt Cu Ni` maps LAMMPS types to), one edge (i, j)
for every neighbour j of i within the file's cutoff (a periodic image counts
as the local atom it is an image of), `edge_vec` = x_j - x_i in float32 with
gradients on, `num_atoms` and `nlocal`. As LAMMPS does, the energy is
`inferred_total_energy`, the forces are dE/d(edge_vec) added to i and
subtracted from j, and the virial is -sum over edges of edge_vec (x) dE/d(edge_vec).

Writes energy (G,) eV, forces (sum N, 3) eV/Å and stress (G, 3, 3) eV/Å^3
(ASE sign: -virial / volume), computed in float32 (the deployed model's
dtype) and stored as float64.
"""

from __future__ import annotations

import sys

import ase.io
import numpy as np
import torch
from ase.neighborlist import neighbor_list


def evaluate(model, atoms, cutoff: float, species: list[str]) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy, forces, stress) of one periodic frame, as pair_e3gnn computes them."""
    i, j, vectors = neighbor_list("ijD", atoms, cutoff)
    n = len(atoms)
    edge_vec = torch.tensor(vectors, dtype=torch.float32, requires_grad=True)
    num_atoms = torch.tensor([n], dtype=torch.int64)
    inputs = {
        "x": torch.tensor([species.index(s) for s in atoms.get_chemical_symbols()], dtype=torch.int64),
        "edge_index": torch.tensor(np.stack([i, j]), dtype=torch.int64),
        "edge_vec": edge_vec,
        "num_atoms": num_atoms,
        "nlocal": num_atoms,
    }
    energy = model(inputs)["inferred_total_energy"].squeeze()
    (de_dr,) = torch.autograd.grad([energy], [edge_vec])
    de_dr = de_dr.double().numpy()
    forces = np.zeros((n, 3))
    np.add.at(forces, i, de_dr)
    np.add.at(forces, j, -de_dr)
    virial = -np.einsum("ea,eb->ab", vectors.astype(np.float32).astype(np.float64), de_dr)
    return float(energy.detach()), forces, -0.5 * (virial + virial.T) / atoms.cell.volume


def main() -> None:
    deployed, frames, out = sys.argv[1:4]
    extra = {"chemical_symbols_to_index": "", "cutoff": ""}
    model = torch.jit.load(deployed, map_location="cpu", _extra_files=extra)
    species = extra["chemical_symbols_to_index"].decode().split()
    cutoff = float(extra["cutoff"].decode())
    results = [evaluate(model, atoms, cutoff, species) for atoms in ase.io.read(frames, ":")]
    np.savez(out, energy=np.array([r[0] for r in results]), forces=np.concatenate([r[1] for r in results]),
             stress=np.array([r[2] for r in results]))


if __name__ == "__main__":
    main()
