"""What LAMMPS's `pair_style mace` computes with a model deployed by `mace.cli.create_lammps_model`.

Run with `.venv-mace/bin/python` (mace-torch 0.3.16):

    lammps_mace_reference.py DEPLOYED-lammps.pt FRAMES.extxyz OUT.npz

Loads the TorchScript file with `torch.jit.load` and calls its
`forward(data, local_or_ghost, compute_virials=True)` with the inputs that
pair_mace.cpp (ACEsuit/lammps, src/ML-MACE) builds, in both of its modes:

- "nodd" (`pair_style mace no_domain_decomposition`): the local atoms only;
  each neighbour within r_max is an edge to the local atom it is an image of,
  with its periodic shift (Å) and unit shift;
- "dd" (the default, domain decomposition): the local atoms plus ghost atoms
  (every periodic image within num_interactions * r_max of a local atom) as
  nodes of their own, all shifts zero; only local site energies are summed
  (the mask), and the forces on ghosts are added to the atoms they are
  images of, as LAMMPS's reverse communication does.

Writes, per mode M: M_energy (G,) eV, M_forces (sum N, 3) eV/Å, M_stress
(G, 3, 3) eV/Å^3 (ASE sign, -virials / volume), float64.
"""

from __future__ import annotations

import sys

import ase.io
import numpy as np
import torch
from ase.neighborlist import neighbor_list


def _inputs(positions, numbers, cell, edge_index, shifts, unit_shifts, atomic_numbers):
    """The data dict pair_mace.cpp passes (cell (3, 3), one graph, one-hot node attributes)."""
    n_nodes = len(positions)
    node_attrs = np.zeros((n_nodes, len(atomic_numbers)))
    node_attrs[np.arange(n_nodes), [atomic_numbers.index(z) for z in numbers]] = 1.0
    as_float = lambda a: torch.tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    return {
        "batch": torch.zeros(n_nodes, dtype=torch.int64),
        "cell": as_float(cell),
        "edge_index": torch.tensor(np.asarray(edge_index, dtype=np.int64)),
        "energy": torch.empty(1, dtype=torch.float64),
        "forces": torch.empty((n_nodes, 3), dtype=torch.float64),
        "node_attrs": as_float(node_attrs),
        "positions": as_float(positions),
        "ptr": torch.tensor([0, n_nodes], dtype=torch.int64),
        "shifts": as_float(shifts),
        "unit_shifts": as_float(unit_shifts),
        "weight": torch.ones(1, dtype=torch.float64),
    }


def _call(model, data, local):
    out = model(data, torch.tensor(local, dtype=torch.bool), True)
    return (float(out["total_energy_local"].detach()[0]), out["forces"].detach().numpy(),
            out["virials"].detach().numpy()[0])


def no_domain_decomposition(model, atoms, r_max, atomic_numbers):
    i, j, unit = neighbor_list("ijS", atoms, r_max)
    cell = atoms.cell.array
    data = _inputs(atoms.positions, atoms.numbers, cell, np.stack([i, j]), unit @ cell, unit, atomic_numbers)
    return _call(model, data, np.ones(len(atoms), bool))


def domain_decomposition(model, atoms, r_max, num_interactions, atomic_numbers):
    n, cell = len(atoms), atoms.cell.array
    reach = num_interactions * r_max
    widths = atoms.cell.volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    k = np.ceil(reach / widths).astype(int) + 1
    images = np.array([(a, b, c) for a in range(-k[0], k[0] + 1) for b in range(-k[1], k[1] + 1)
                       for c in range(-k[2], k[2] + 1) if (a, b, c) != (0, 0, 0)])
    candidates = (atoms.positions[None, :, :] + (images @ cell)[:, None, :]).reshape(-1, 3)
    owners = np.tile(np.arange(n), len(images))
    distance = np.linalg.norm(candidates[:, None, :] - atoms.positions[None, :, :], axis=-1).min(axis=1)
    ghost = distance < reach
    positions = np.concatenate([atoms.positions, candidates[ghost]])
    owner = np.concatenate([np.arange(n), owners[ghost]])
    cluster = ase.Atoms(numbers=atoms.numbers[owner], positions=positions, pbc=False)
    i, j = neighbor_list("ij", cluster, r_max)  # every node's neighbours, ghosts' included (REQ_GHOST)
    zeros = np.zeros((len(i), 3))
    data = _inputs(positions, cluster.numbers, cell, np.stack([i, j]), zeros, zeros, atomic_numbers)
    energy, node_forces, virials = _call(model, data, np.arange(len(positions)) < n)
    forces = np.zeros((n, 3))
    np.add.at(forces, owner, node_forces)  # reverse communication: ghost forces to their owners
    return energy, forces, virials


def main() -> None:
    deployed, frames, out = sys.argv[1:4]
    torch.set_default_dtype(torch.float64)
    model = torch.jit.load(deployed, map_location="cpu")
    r_max = float(model.r_max)
    num_interactions = int(model.num_interactions)
    atomic_numbers = [int(z) for z in model.atomic_numbers]
    results = {f"{mode}_{key}": [] for mode in ("nodd", "dd") for key in ("energy", "forces", "stress")}
    for atoms in ase.io.read(frames, ":"):
        for mode, (energy, forces, virials) in {
            "nodd": no_domain_decomposition(model, atoms, r_max, atomic_numbers),
            "dd": domain_decomposition(model, atoms, r_max, num_interactions, atomic_numbers),
        }.items():
            results[f"{mode}_energy"].append(energy)
            results[f"{mode}_forces"].append(forces)
            results[f"{mode}_stress"].append(-virials / atoms.cell.volume)
    np.savez(out, **{key: (np.concatenate(v) if key.endswith("forces") else np.array(v)) for key, v in results.items()})


if __name__ == "__main__":
    main()
