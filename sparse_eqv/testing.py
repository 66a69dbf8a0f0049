"""Small model configs and data files for the tests and the benchmark scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sparse_eqv.data.frames import Frame


def tiny_sevenn_config() -> dict[str, Any]:
    """A SevenNet-architecture config small enough to compile quickly: Li, P, S,
    Ge (SSE-PBE's elements), r_max 3.5 Å, l <= 1, 4 channels, two layers, float64.

    Returns a new dict on every call (callers may change it).
    """
    return {
        "model": "sevenn",
        "atomic_numbers": [3, 15, 16, 32],
        "r_max": 3.5,
        "dtype": "float64",
        "embedding": {"features": 4, "scale": 0.5, "node_attrs": "one_hot"},
        "radial_basis": {"num_basis": 4, "cutoff": "polynomial", "cutoff_arg": 6.0},
        "irreps_sh": "1x0e+1x1o",
        "sh_normalize": True,
        "layers": [
            {
                "irreps_in": "4x0e",
                "gate": {"scalars": "4x0e", "act_scalars": ["silu"], "gates": "2x0e", "act_gates": ["sigmoid"],
                         "gated": "2x1o"},
                "radial": {"hidden": [4, 8], "kind": "e3nn", "act": "silu"},
                "self_connection": "linear",
                "sort_instructions": True,
            },
            {
                "irreps_in": "4x0e+2x1o",
                "gate": {"scalars": "4x0e", "act_scalars": ["silu"], "gates": "", "act_gates": [], "gated": ""},
                "radial": {"hidden": [4, 8], "kind": "e3nn", "act": "silu"},
                "self_connection": "tensor_product",
                "sort_instructions": True,
            },
        ],
        "readout": {"dims": [4, 2, 1], "kind": "e3nn", "act": None},
    }


def write_extxyz(path: str | Path, frames: Sequence[Frame]) -> Path:
    """The frames as extxyz with their energy (eV) and forces (eV/Å) labels; returns `path`."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    images = []
    for f in frames:
        atoms = f.to_atoms()
        atoms.calc = SinglePointCalculator(atoms, energy=f.energy, forces=f.forces)
        images.append(atoms)
    ase.io.write(path, images, format="extxyz")
    return Path(path)


def tiny_variables(seed: int = 0) -> dict[str, Any]:
    """Random variables ({"params", "constants"}, numpy) of `tiny_sevenn_config()` from PRNG `seed`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sparse_eqv.models import build_model

    variables = build_model(tiny_sevenn_config()).init(
        jax.random.PRNGKey(seed), jnp.ones((3, 3)), jnp.zeros(2, jnp.int32), jnp.array([0, 1, 0]), jnp.array([1, 0, 1])
    )
    return jax.tree.map(np.asarray, variables)


def write_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """A model directory of `tiny_sevenn_config()` with random weights (PRNG `seed`); returns it."""
    from sparse_eqv.checkpoint import save_model

    return save_model(directory, tiny_sevenn_config(), tiny_variables(seed))


def write_labelled_frames(path: str | Path, n_frames: int, *, seed: int = 0, teacher_seed: int = 1,
                          n_atoms: int = 8, box: float = 6.0) -> Path:
    """Periodic Li/P/S/Ge frames as extxyz, labelled by a `tiny_sevenn_config()`
    model with random weights (PRNG `teacher_seed`): energy (eV), forces (eV/Å)
    and stress (eV/Å^3). Each frame: `n_atoms` atoms of random elements at
    random positions at least 1.6 Å apart (numpy PRNG `seed`) in a cubic cell
    of edge `box` Å. Returns `path`."""
    import ase.io
    import numpy as np
    from ase.calculators.singlepoint import SinglePointCalculator

    from sparse_eqv.inference import Predictor

    config = tiny_sevenn_config()
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n_frames):
        positions: list[np.ndarray] = []
        while len(positions) < n_atoms:  # rejection sampling under periodic images
            candidate = rng.uniform(0.0, box, 3)
            gaps = [candidate - p - box * np.round((candidate - p) / box) for p in positions]
            if all(np.linalg.norm(g) >= 1.6 for g in gaps):
                positions.append(candidate)
        frames.append(Frame(numbers=rng.choice(config["atomic_numbers"], n_atoms), positions=np.array(positions),
                            cell=box * np.eye(3), pbc=np.ones(3, bool), source=f"generated:{k}"))
    images = []
    for frame, label in zip(frames, Predictor(config, tiny_variables(teacher_seed)).predict(frames)):
        atoms = frame.to_atoms()
        atoms.calc = SinglePointCalculator(atoms, energy=label["energy"], forces=label["forces"],
                                           stress=label["stress"])
        images.append(atoms)
    ase.io.write(path, images, format="extxyz")
    return Path(path)
