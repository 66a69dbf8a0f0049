"""Training state: one run's counters and arrays, the K-run form the step works on, and their checkpoints.

A run's trainable tree (a method's `init`) holds frozen leaves (the base
params the method does not train) beside its own leaves (STR deltas and
scores, ELoRA factors, dense params). The training step works on K >= 1 runs
at once (`RunsState`): the frozen leaves once (`shared`), every other leaf,
its optimiser state and its EMA with a leading run axis of size K. An
ordinary run is K = 1.

Checkpoints are directories written atomically: orbax arrays (the flattened
leaves, numbered) and a JSON file of scalars. An ordinary run's checkpoint is
its `TrainState` (tree with the frozen leaves, optimiser state, EMA); a run of
several variants checkpoints the `RunsState` whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sparse_eqv.atomic_write import atomic_directory
from sparse_eqv.checkpoint import pytree_checkpointer
from sparse_eqv.errors import CheckpointError

STATE_FILE = "state.json"
ARRAYS_DIR = "arrays"


@dataclasses.dataclass
class TrainState:
    """One run: its counters and log rows and, where a checkpoint or a callback
    needs them, its host arrays.

    Attributes:
        tree: the method's trainable tree (frozen leaves included), or None.
        opt_state: optax state of the non-frozen leaves, or None.
        ema: moving average of `tree`, or None.
        step: optimiser steps done.
        epoch: current epoch (0-based); batch: next batch within it (loader position).
        lr_scale: schedule factor on the peak lr (plateau).
        best_loss, best_epoch: best validation loss so far.
        plateau_best, bad_epochs: plateau-schedule counters.
        epoch_loss, epoch_batches: running train loss of the current epoch.
        stopped: early stopping (or the time limit) triggered.
        wall: seconds spent training (summed over resumed sessions).
        history: one dict per finished epoch (the CSV log rows).
    """

    tree: Any = None
    opt_state: Any = None
    ema: Any = None
    step: int = 0
    epoch: int = 0
    batch: int = 0
    lr_scale: float = 1.0
    best_loss: float = math.inf
    best_epoch: int = -1
    plateau_best: float = math.inf
    bad_epochs: int = 0
    epoch_loss: float = 0.0
    epoch_batches: int = 0
    stopped: bool = False
    wall: float = 0.0
    history: list = dataclasses.field(default_factory=list)

    _SCALARS = (
        "step", "epoch", "batch", "lr_scale", "best_loss", "best_epoch", "plateau_best",
        "bad_epochs", "epoch_loss", "epoch_batches", "stopped", "wall", "history",
    )

    def arrays(self) -> dict[str, Any]:
        return {"tree": self.tree, "opt_state": self.opt_state, "ema": self.ema}

    def scalars(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SCALARS}


@dataclasses.dataclass
class RunsState:
    """K runs trained by one step; checkpointed whole when K > 1.

    Attributes:
        shared: the frozen leaves of the trainable tree (one copy, never differentiated).
        own: the other leaves, each with a leading run axis (K, ...).
        opt_state: optax state of `own`, every leaf with a leading run axis.
        ema: moving average of `own` (K, ...), or None.
        runs: per run, a TrainState holding its counters and log rows (its
            array fields are None except in the copies `Trainer.run_state` makes).
    """

    shared: list
    own: list
    opt_state: Any
    ema: list | None
    runs: list[TrainState]

    def arrays(self) -> dict[str, Any]:
        return {"shared": self.shared, "own": self.own, "opt_state": self.opt_state, "ema": self.ema}

    def scalars(self) -> dict[str, Any]:
        return {"runs": [run.scalars() for run in self.runs]}

    def on_host(self) -> "RunsState":
        """A copy with numpy arrays (the same `runs`)."""
        return RunsState(*jax.tree.map(np.asarray, (self.shared, self.own, self.opt_state, self.ema)), runs=self.runs)


def save_state(directory: Path, state: TrainState | RunsState) -> None:
    """Write the state atomically: orbax arrays (flattened leaves) + JSON scalars."""
    leaves = jax.tree.leaves(state.arrays())
    with atomic_directory(directory, overwrite=True) as tmp:
        arrays = {f"{i:06d}": np.asarray(x) for i, x in enumerate(leaves)}
        pytree_checkpointer().save((tmp / ARRAYS_DIR).absolute(), arrays)
        scalars = state.scalars()
        scalars["n_leaves"] = len(leaves)
        (tmp / STATE_FILE).write_text(json.dumps(scalars, indent=1))


def read_saved_arrays(directory: Path, template_arrays: Any) -> Any:
    """The array tree written by `save_state`, checked leaf by leaf against `template_arrays`' shapes."""
    template_leaves = jax.tree.leaves(template_arrays)
    arrays = pytree_checkpointer().restore((directory / ARRAYS_DIR).absolute())
    leaves = [np.asarray(arrays[f"{i:06d}"]) for i in range(len(template_leaves))]
    for i, (a, b) in enumerate(zip(leaves, template_leaves)):
        if a.shape != np.shape(b):
            raise CheckpointError(f"{directory}: leaf {i} has shape {a.shape}, this run expects {np.shape(b)}")
    return jax.tree.unflatten(jax.tree.structure(template_arrays), leaves)


def restore_state(directory: Path, template: TrainState) -> TrainState:
    """An ordinary run's state saved by `save_state`; `template` gives the tree structure."""
    scalars = json.loads((directory / STATE_FILE).read_text())
    if "runs" in scalars or scalars.pop("n_leaves") != len(jax.tree.leaves(template.arrays())):
        raise CheckpointError(f"{directory}: checkpoint does not match this run's method and model (leaf count)")
    return TrainState(**read_saved_arrays(directory, template.arrays()), **scalars)


def restore_runs_state(directory: Path, template: RunsState) -> RunsState:
    """The K-run state saved by `save_state`; `template` gives the structure."""
    scalars = json.loads((directory / STATE_FILE).read_text())
    if scalars.get("n_leaves") != len(jax.tree.leaves(template.arrays())) or len(scalars.get("runs", ())) != len(
        template.runs
    ):
        raise CheckpointError(f"{directory}: checkpoint does not match this run's variants, method and model")
    runs = [TrainState(**run) for run in scalars["runs"]]
    return RunsState(**read_saved_arrays(directory, template.arrays()), runs=runs)
