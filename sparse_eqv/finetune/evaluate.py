"""Errors of a model (zero-shot) or a fine-tuned run on a labelled data set.

Reported twice: raw, and after a least-squares per-element E0 shift fitted
on the same data (`sparse_eqv.finetune.e0s`), which removes a difference of
energy reference (DFT code, functional, pseudopotentials) so that a
zero-shot foundation model and a fine-tuned one are compared fairly. Forces
and stress do not depend on the shift.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

import ase.data
import numpy as np

from sparse_eqv.checkpoint import load_for_inference
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.readers import read_frames
from sparse_eqv.finetune.e0s import composition, fit_e0_shift
from sparse_eqv.finetune.losses import error_metrics
from sparse_eqv.inference import Predictor


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `evaluate` computed.

    Attributes:
        metrics: what `sparse-eqv evaluate --json` writes: model, data,
            finetuned, and `prediction_metrics`'s "raw", "e0_fit",
            "e0_shift_eV" (meV/atom, meV/Å, meV/Å^3; eV per element).
        frames: the labelled frames of the data file.
        predictions: `Predictor.predict`'s per-frame dicts (eV, eV/Å, eV/Å^3).
    """

    metrics: dict[str, Any]
    frames: list[Frame]
    predictions: list[dict[str, np.ndarray]]


def evaluate(path: str | Path, data: str | Path, *, max_atoms: int = 1024, progress: Iterable | None = None,
             read_options: dict[str, str] | None = None) -> Evaluation:
    """Metrics (meV/atom, meV/Å, meV/Å^3) of the model or run at `path` on `data`,
    with the frames and predictions they come from."""
    config, variables = load_for_inference(path)
    frames = read_frames(data, **(read_options or {}))
    predictions = Predictor(config, variables).predict(frames, max_atoms=max_atoms, progress=progress)
    metrics = {
        "model": str(path),
        "data": str(data),
        "finetuned": "finetuned" in config,
        **prediction_metrics(frames, predictions, config["atomic_numbers"]),
    }
    return Evaluation(metrics, frames, predictions)


def prediction_metrics(frames: Sequence[Frame], predictions: Sequence[dict], atomic_numbers: Sequence[int]) -> dict[str, Any]:
    """"raw" error metrics of `predictions` on the labelled `frames`, and with
    energy labels "e0_fit" (after the per-element shift "e0_shift_eV")."""
    out: dict[str, Any] = {"raw": error_metrics(frames, predictions)}
    if any(f.energy is not None for f in frames):
        shift = fit_e0_shift(frames, [p["energy"] for p in predictions], atomic_numbers)
        out["e0_fit"] = error_metrics(frames, predictions, composition(frames, atomic_numbers) @ shift)
        out["e0_shift_eV"] = {ase.data.chemical_symbols[z]: float(s) for z, s in zip(atomic_numbers, shift) if s != 0.0}
    return out
