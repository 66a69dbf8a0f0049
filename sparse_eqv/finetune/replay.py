"""Replay: frames outside the fine-tuning data whose loss is added at every step.

The MACE team's study of fine-tuning strategies (arXiv 2606.12704) found that
only replay kept a foundation model's accuracy away from the new data. The
user's replay file may hold bare structures: by default they are labelled
by the base model itself (pseudolabels: energy, forces, stress), with the
run's fitted E0s, so replay asks the model to keep predicting what it
predicted. With labels "file", the frames' own labels are used, their
energies moved onto the run's reference by a per-element offset fitted
against the base model.

Labels are computed once and cached in RUN_DIR/replay_labels.npz (float64);
the run reads them back from there, so a resumed run trains on the same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.data.frames import Frame
from sparse_eqv.errors import DataError, SparseEqvError
from sparse_eqv.finetune.e0s import composition, fit_e0_shift

CACHE_FILE = "replay_labels.npz"
LABEL_SOURCES = ("base", "file")


def check_labels(frames: Sequence[Frame], source: str, path: Path) -> None:
    """DataError unless `source` is known and, for "file", every frame has energy and forces."""
    if source not in LABEL_SOURCES:
        raise SparseEqvError(f"--replay-labels {source!r}; known: {', '.join(LABEL_SOURCES)}")
    unlabelled = [f.source for f in frames if f.energy is None or f.forces is None]
    if source == "file" and unlabelled:
        raise DataError(f"{path}: --replay-labels file, but {unlabelled[0]} has no energy and forces "
                        f"({len(unlabelled)} such frame(s)); leave --replay-labels at base to label them")


def replay_labels(frames: Sequence[Frame], predict: Callable[[Sequence[Frame]], list[dict]], source: str,
                  atomic_numbers: Sequence[int], path: Path) -> dict[str, np.ndarray]:
    """Labels of the replay frames as arrays: energy (F,) eV, forces (sum N, 3)
    eV/Å, stress (F, 3, 3) eV/Å^3 with has_stress (F,) bool.

    Args:
        predict: the base model with the run's constants, frames -> dicts.
        source: "base" (pseudolabels) or "file" (the frames' own labels).
        path: the replay file, for errors.
    """
    predictions = predict(frames)
    if source == "base":
        energy = np.array([p["energy"] for p in predictions])
        forces = [p["forces"] for p in predictions]
        stress = [p.get("stress") for p in predictions]
    else:
        check_labels(frames, source, path)
        shift = fit_e0_shift(frames, [p["energy"] for p in predictions], atomic_numbers)
        energy = np.array([f.energy for f in frames]) - composition(frames, atomic_numbers) @ shift
        forces = [f.forces for f in frames]
        stress = [f.stress for f in frames]
    return {
        "energy": np.asarray(energy, np.float64),
        "forces": np.concatenate([np.asarray(f, np.float64) for f in forces]),
        "stress": np.array([np.zeros((3, 3)) if s is None else np.asarray(s, np.float64) for s in stress]),
        "has_stress": np.array([s is not None for s in stress]),
    }


def write_cache(run_dir: Path, labels: dict[str, np.ndarray]) -> None:
    with atomic_file(run_dir / CACHE_FILE) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **labels)


def read_cache(run_dir: Path, frames: Sequence[Frame]) -> list[Frame]:
    """The replay frames with the cached labels attached."""
    path = run_dir / CACHE_FILE
    with np.load(path) as data:
        labels = {k: data[k] for k in data.files}
    n_atoms = sum(f.num_atoms for f in frames)
    if labels["energy"].shape != (len(frames),) or labels["forces"].shape != (n_atoms, 3):
        raise DataError(f"{path}: holds labels of {labels['energy'].shape[0]} frames / {labels['forces'].shape[0]} "
                        f"atoms, the replay file has {len(frames)} / {n_atoms}")
    out, offset = [], 0
    for k, frame in enumerate(frames):
        out.append(dataclasses.replace(
            frame, energy=float(labels["energy"][k]), forces=labels["forces"][offset : offset + frame.num_atoms],
            stress=labels["stress"][k] if labels["has_stress"][k] else None,
        ))
        offset += frame.num_atoms
    return out
