"""Per-element reference energies (E0s) fitted on a new data set.

A user's DFT energies often sit on another reference than the foundation
model's (code, functional, pseudopotentials). As MACE's fine-tuning does,
fit per-element shifts dE0_z by least squares on the base model's residual

    E_ref(g) - E_model(g) = sum_z n_gz dE0_z        (n_gz: atoms of z in g)

and add them to the model's per-element energy constant, a constants leaf
of shape (n_elements,) in eV that the model adds to every atom's energy
unscaled (MACE: the atomic energies E0s; NequIP / SevenNet: the per-type
shift). A converted config names it as `config["e0_constant"]`, e.g.
"constants/atomic_energies"; without it the leaf is found by name.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from flax import traverse_util

from sparse_eqv.data.frames import Frame
from sparse_eqv.errors import SparseEqvError

_KNOWN_NAMES = ("atomic_energies", "e0s", "E0s", "shift", "per_type_shift", "per_species_shift", "shifts")


def e0_key(config: dict[str, Any], constants: Any) -> tuple[str, ...]:
    """Flattened key (within constants) of the per-element energy leaf."""
    flat = traverse_util.flatten_dict(constants)
    n_elements = len(config["atomic_numbers"])
    named = config.get("e0_constant")
    if named:
        key = tuple(named.split("/")[1:] if named.startswith("constants/") else named.split("/"))
        if key not in flat:
            raise SparseEqvError(f"config.json e0_constant {named!r} is not a constants leaf of the model")
        candidates = [key]
    else:
        candidates = [k for k in flat if k[-1] in _KNOWN_NAMES and np.shape(flat[k]) == (n_elements,)]
    if len(candidates) != 1 or np.shape(flat[candidates[0]]) != (n_elements,):
        found = ", ".join("/".join(k) + f" {np.shape(flat[k])}" for k in candidates) or "none"
        raise SparseEqvError(
            f"cannot fit E0s: this model has no single per-element energy constant of shape ({n_elements},) "
            f"(candidates: {found}); use --e0s keep"
        )
    return candidates[0]


def composition(frames: Sequence[Frame], atomic_numbers: Sequence[int]) -> np.ndarray:
    """(n_frames, n_elements) atom counts per element of the model's table."""
    index = {int(z): i for i, z in enumerate(atomic_numbers)}
    counts = np.zeros((len(frames), len(atomic_numbers)))
    for g, frame in enumerate(frames):
        for z in frame.numbers:
            counts[g, index[int(z)]] += 1
    return counts


def fit_e0_shift(
    frames: Sequence[Frame], predicted_energies: Sequence[float], atomic_numbers: Sequence[int]
) -> np.ndarray:
    """Least-squares dE0 (n_elements,) eV on E_ref - E_model.

    Elements absent from the frames get 0; when the compositions do not
    determine every element (e.g. one stoichiometry), the minimum-norm
    solution is taken, which still removes the mean residual per atom.
    """
    labelled = [(f, e) for f, e in zip(frames, predicted_energies) if f.energy is not None]
    if not labelled:
        raise SparseEqvError("cannot fit E0s: no frame has an energy label")
    counts = composition([f for f, _ in labelled], atomic_numbers)
    residual = np.array([f.energy - e for f, e in labelled])
    present = counts.sum(axis=0) > 0
    shift = np.zeros(len(atomic_numbers))
    shift[present] = np.linalg.lstsq(counts[:, present], residual, rcond=None)[0]
    return shift


def shift_e0s(config: dict[str, Any], variables: Any, shift: np.ndarray) -> Any:
    """Variables with `shift` (n_elements,) eV added to the per-element energy constant."""
    key = e0_key(config, variables["constants"])
    flat = traverse_util.flatten_dict(variables["constants"])
    flat[key] = np.asarray(flat[key]) + shift.astype(np.asarray(flat[key]).dtype)
    return {**variables, "constants": traverse_util.unflatten_dict(flat)}
