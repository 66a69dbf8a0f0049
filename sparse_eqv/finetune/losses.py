"""Weighted energy / forces / stress loss and MAE / RMSE metrics.

Loss (MACE's weighted loss, with optional Huber in place of the square):

    L = w_E <((E - E_ref) / N)^2>_graphs + w_F <(F - F_ref)^2>_components
        + w_S <(S - S_ref)^2>_components [+ w_M <(m - m_ref)^2>_components]

The moment term (μB) exists when the model has a magnetic-moment head and
the graphs carry moment labels (`sparse_eqv.finetune.magmom`).

Averages run over the graphs / atoms that carry the label. Every function
here returns sums and counts over one padded batch, so that a batch split
over devices adds up to exactly the loss of the whole batch.

Units: energies eV, forces eV/Å, stress eV/Å^3; metrics (computed on the host
from per-frame predictions) in meV/atom, meV/Å, meV/Å^3; moments in μB.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from sparse_eqv.data.frames import Frame
from sparse_eqv.finetune.magmom import magmom_metrics

TERMS = ("energy", "forces", "stress")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms and the Huber delta (None: squared error)."""

    energy: float = 1.0
    forces: float = 100.0
    stress: float = 1.0
    huber_delta: float | None = None
    magmoms: float = 1.0  # used only with a magnetic-moment head


def _errors(pred: dict[str, jax.Array], graph: jraph.GraphsTuple) -> dict[str, tuple[jax.Array, jax.Array]]:
    """(error, mask) per term: energy per atom (G,), forces (N, 3), stress (G, 3, 3)."""
    g = graph.globals
    graph_mask = jraph.get_graph_padding_mask(graph)
    node_mask = jraph.get_node_padding_mask(graph)
    n_graph, n_node = graph.n_node.shape[0], graph.nodes["positions"].shape[0]
    node_graph = jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=n_node)
    n_atoms = jnp.maximum(graph.n_node, 1).astype(pred["energy"].dtype)
    energy_mask = graph_mask * (g["energy_weight"] > 0)
    forces_mask = node_mask * (g["forces_weight"][node_graph] > 0)
    stress_mask = graph_mask * (g["stress_weight"] > 0)
    out = {
        "energy": ((pred["energy"] - g["energy"]) / n_atoms, energy_mask),
        "forces": (pred["forces"] - graph.nodes["forces"], jnp.broadcast_to(forces_mask[:, None], (n_node, 3))),
        "stress": (pred["stress"] - g["stress"], jnp.broadcast_to(stress_mask[:, None, None], (n_graph, 3, 3))),
    }
    if "magmoms" in pred and "magmoms" in graph.nodes:
        error = pred["magmoms"] - graph.nodes["magmoms"]
        mask = node_mask * (g["magmoms_weight"][node_graph] > 0)
        out["magmoms"] = (error, jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (error.ndim - 1)), error.shape))
    return out


def loss_sums(pred: dict[str, jax.Array], graph: jraph.GraphsTuple, weights: LossWeights) -> dict[str, jax.Array]:
    """Per term: sum of the pointwise loss and the number of labelled entries."""
    out = {}
    for term, (error, mask) in _errors(pred, graph).items():
        mask = mask.astype(error.dtype)
        error = jnp.where(mask > 0, error, 0.0)
        if weights.huber_delta is None:
            pointwise = error**2
        else:
            pointwise = 2.0 * _huber(error, weights.huber_delta)
        out[term] = jnp.sum(pointwise * mask)
        out[term + "_count"] = jnp.sum(mask)
    return out


def _huber(x: jax.Array, delta: float) -> jax.Array:
    abs_x = jnp.abs(x)
    return jnp.where(abs_x <= delta, 0.5 * x**2, delta * (abs_x - 0.5 * delta))


def total_loss(sums: dict[str, jax.Array], weights: LossWeights) -> jax.Array:
    """Weighted mean loss from (possibly device-summed) sums and counts."""
    loss = 0.0
    for term in TERMS + ("magmoms",):
        w = getattr(weights, term)
        if w and term in sums:
            loss = loss + w * sums[term] / jnp.maximum(sums[term + "_count"], 1.0)
    return loss


def error_metrics(
    frames: Sequence[Frame], predictions: Sequence[dict[str, np.ndarray]], energy_shift: np.ndarray | None = None
) -> dict[str, float | None]:
    """MAE and RMSE over the labelled frames, on the host in float64.

    Args:
        frames: labelled frames.
        predictions: per frame "energy" eV, "forces" (N, 3) eV/Å, "stress" (3, 3) eV/Å^3.
        energy_shift: optional per-atom energy added to each prediction,
            (n_frames,) eV total per frame (an E0 correction).

    Returns:
        energy_mae / energy_rmse in meV/atom, forces_* in meV/Å, stress_* in
        meV/Å^3, n_frames; None where no frame carries the label; with
        predicted moments also magmoms_mae / magmoms_rmse in μB.
    """
    errors: dict[str, list[np.ndarray]] = {term: [] for term in TERMS}
    for g, (frame, pred) in enumerate(zip(frames, predictions)):
        if frame.energy is not None:
            shift = 0.0 if energy_shift is None else float(energy_shift[g])
            errors["energy"].append(np.atleast_1d((pred["energy"] + shift - frame.energy) / frame.num_atoms))
        if frame.forces is not None:
            errors["forces"].append(np.ravel(pred["forces"] - frame.forces))
        if frame.stress is not None and frame.periodic:
            errors["stress"].append(np.ravel(pred["stress"] - frame.stress))
    out: dict[str, float | None] = {"n_frames": len(frames)}
    for term in TERMS:
        e = np.concatenate(errors[term]) if errors[term] else None
        out[f"{term}_mae"] = None if e is None else 1e3 * float(np.mean(np.abs(e)))
        out[f"{term}_rmse"] = None if e is None else 1e3 * float(np.sqrt(np.mean(e**2)))
    if any("magmoms" in p for p in predictions):
        out.update(magmom_metrics(frames, predictions))  # μB
    return out
