"""Batched, jitted prediction over lists of frames with bounded recompilation."""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph
from sparse_eqv.errors import SparseEqvError, out_of_memory
from sparse_eqv.models import build_model
from sparse_eqv.potential import energy_forces_stress

# Edge grid of prediction budgets: every model's cost grows with the edge count, so a new budget pads
# at most 5 % (training keeps the coarser default grid: its budgets are bounded by the data set).
PREDICT_EDGE_GRANULARITY = 1.05


def _dtype(config: dict[str, Any]):
    return jnp.float64 if config.get("dtype", "float64") == "float64" else jnp.float32


def cast_floats(tree: Any, dtype) -> Any:
    """Cast every floating leaf of a pytree (graph or variables) to `dtype`."""
    return jax.tree.map(lambda x: np.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x, tree)


def frame_batches(frames: Sequence[Frame], max_atoms: int) -> Iterator[list[int]]:
    """Consecutive frame indices, grouped so each batch holds <= max_atoms atoms
    (a larger single frame forms a batch of its own)."""
    batch, atoms = [], 0
    for index, frame in enumerate(frames):
        if batch and atoms + frame.num_atoms > max_atoms:
            yield batch
            batch, atoms = [], 0
        batch.append(index)
        atoms += frame.num_atoms
    if batch:
        yield batch


@functools.lru_cache(maxsize=16)
def prediction_function(config_json: str) -> Callable:
    """The jitted (variables, padded graph) -> energy/forces/stress of the model
    a config (as sorted JSON) describes: one per model, shared by its Predictors,
    so a second Predictor (or Calculator) of the same model compiles nothing new."""
    config = json.loads(config_json)
    module, cutoff = build_model(config), float(config["r_max"])
    return jax.jit(lambda variables, graph: energy_forces_stress(module.apply, variables, graph, cutoff))


class Predictor:
    """A converted (or fine-tuned) model ready to predict energies, forces, stress
    (and magnetic moments, when the config has a "magmom" head).

    Attributes:
        config: the model directory's config.
        variables: {"params", "constants"} in the model's dtype, kept on the
            default device (passing host arrays to every call copied them
            each time: 5 ms of MACE-MP-0b3-medium's 42 ms aspirin prediction
            in float32). Assigning new weights of the same architecture casts
            and places them, and reuses the compiled prediction.
        budgets: the padding budgets seen so far (at most one compilation each).
    """

    def __init__(self, config: dict[str, Any], variables: Any):
        self.config = config
        self.dtype = _dtype(config)
        self.module = build_model(config)
        self.variables = variables
        self.budgets: set[GraphBudget] = set()
        self._predict = prediction_function(json.dumps(config, sort_keys=True))

    @property
    def variables(self) -> Any:
        return self._variables

    @variables.setter
    def variables(self, variables: Any) -> None:
        self._variables = jax.device_put(cast_floats(variables, self.dtype))

    @property
    def cutoff(self) -> float:
        return float(self.config["r_max"])

    @property
    def atomic_numbers(self) -> list[int]:
        return list(self.config["atomic_numbers"])

    def graph(self, frame: Frame) -> jraph.GraphsTuple:
        return frame_to_graph(frame, self.atomic_numbers, self.cutoff)

    def batch(self, graphs: Sequence[jraph.GraphsTuple]) -> jraph.GraphsTuple:
        """Graphs as one padded batch: the smallest budget already compiled that
        fits and is no larger than the coarse grid's (`GraphBudget.round_up`), so
        a reused budget pads no more than training's grid would; else a new one on
        a fine edge grid (`PREDICT_EDGE_GRANULARITY`)."""
        n_node, n_edge = sum(int(g.n_node.sum()) for g in graphs), sum(int(g.n_edge.sum()) for g in graphs)
        coarse = GraphBudget.round_up(n_node, n_edge, len(graphs))
        fitting = [
            b for b in self.budgets
            if n_node < b.n_node <= coarse.n_node and n_edge <= b.n_edge <= coarse.n_edge and len(graphs) < b.n_graph
        ]
        budget = min(fitting, key=lambda b: (b.n_edge, b.n_node, b.n_graph)) if fitting else GraphBudget.round_up(
            n_node, n_edge, len(graphs), edge_granularity=PREDICT_EDGE_GRANULARITY
        )
        return batch_graphs(graphs, budget)

    def predict_graph(self, graph: jraph.GraphsTuple) -> dict[str, np.ndarray]:
        """Predictions for a padded batch, as numpy arrays (padding included)."""
        budget = GraphBudget(int(graph.n_node.sum()), int(graph.n_edge.sum()), len(graph.n_node))
        self.budgets.add(budget)
        try:
            return jax.tree.map(np.asarray, self._predict(self.variables, cast_floats(graph, self.dtype)))
        except jax.errors.JaxRuntimeError as error:
            if not out_of_memory(error):
                raise
            raise SparseEqvError(
                f"out of memory predicting a batch padded to {budget.n_node} atoms and {budget.n_edge} edges: "
                "use fewer atoms per batch (--batch-atoms, or Predictor.predict(max_atoms=...))"
            ) from error

    def predict(self, frames: Sequence[Frame], max_atoms: int = 1024, progress: Iterable | None = None) -> list[dict[str, np.ndarray]]:
        """Per-frame dicts: energy (eV), forces (N, 3) eV/Å, stress (3, 3) eV/Å^3 (periodic only),
        magmoms (N,) or (N, 3) μB (models with a moment head). SparseEqvError naming the frame when a
        prediction is NaN or inf."""
        results: list[dict[str, np.ndarray]] = []
        for indices in frame_batches(frames, max_atoms):
            graphs = [self.graph(frames[i]) for i in indices]
            out = self.predict_graph(self.batch(graphs))
            offset = 0
            for g, i in enumerate(indices):
                n = frames[i].num_atoms
                result = {"energy": float(out["energy"][g]), "forces": out["forces"][offset : offset + n]}
                if frames[i].periodic:
                    result["stress"] = out["stress"][g]
                if "magmoms" in out:  # a model with a magnetic-moment head
                    result["magmoms"] = out["magmoms"][offset : offset + n]
                bad = [k for k, v in result.items() if not np.all(np.isfinite(v))]
                if bad:
                    raise SparseEqvError(f"{frames[i].source}: the model predicts non-finite {', '.join(bad)}")
                results.append(result)
                offset += n
            if progress is not None:
                progress.update(len(indices))
        return results
