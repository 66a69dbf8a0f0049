"""Neighbour lists and padded `jraph.GraphsTuple` batches.

Edge convention (all models): edge e points from the neighbour
`senders[e]` (j) to the centre `receivers[e]` (i); messages are summed onto
receivers. The edge vector the models see is

    r_j - r_i + shifts[e] @ cell        (from the centre to the neighbour, Å)

computed in `sparse_eqv.potential` so that forces and stress come from one
gradient. Models that use the opposite direction (MACE) negate it.

Graph fields:
    nodes:   positions (N, 3) Å, species (N,) int32 index into the model's
             element table, forces (N, 3) eV/Å labels (zeros if absent)
    edges:   shifts (E, 3) integer lattice offsets (as float)
    globals: cell (G, 3, 3) Å, energy (G,) eV, stress (G, 3, 3) eV/Å^3,
             energy_weight / forces_weight / stress_weight (G,) 1.0 where the
             label exists, else 0.0
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import ase.data
import jraph
import numpy as np
from matscipy.neighbours import neighbour_list

from sparse_eqv.data.frames import Frame
from sparse_eqv.errors import DataError


def species_indices(frame: Frame, atomic_numbers: Sequence[int]) -> np.ndarray:
    """Map atomic numbers to indices in the model's element table.

    Returns:
        (N,) int32. Raises DataError naming the element and the frame when
        the model does not know an element.
    """
    table = {int(z): i for i, z in enumerate(atomic_numbers)}
    unknown = sorted({int(z) for z in frame.numbers} - set(table))
    if unknown:
        names = ", ".join(f"{ase.data.chemical_symbols[z]} (Z={z})" for z in unknown)
        known = " ".join(ase.data.chemical_symbols[int(z)] for z in atomic_numbers)
        raise DataError(f"{frame.source}: element {names} is not in the model (it knows: {known})")
    return np.array([table[int(z)] for z in frame.numbers], dtype=np.int32)


# Closest approach of two atoms (Å, periodic images included) a frame may have: nearer pairs make the
# edge directions, hence every prediction, NaN; real structures stay above ~0.5 Å.
MIN_DISTANCE = 0.1


def neighbour_edges(frame: Frame, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbour list within `cutoff` Å (both directions, no self edge).

    Raises DataError naming the frame and the two atoms when a pair is closer
    than MIN_DISTANCE.

    Returns:
        receivers (E,) centre i, senders (E,) neighbour j, shifts (E, 3) int
        lattice offsets S with r_j + S @ cell - r_i the edge vector.
    """
    positions = np.asarray(frame.positions, dtype=np.float64)
    pbc = np.asarray(frame.pbc, dtype=bool)
    cell = np.array(frame.cell, dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        bad = np.argwhere(~np.isfinite(positions))[0][0]
        raise DataError(f"{frame.source}: position of atom {bad} is not finite (NaN or inf)")
    # matscipy needs a cell in every direction: give non-periodic directions a
    # box wider than the structure plus the cutoff (no image can come in range).
    if not np.all(pbc):
        extent = positions.max(axis=0) - positions.min(axis=0) if len(positions) else np.zeros(3)
        size = float(extent.max()) + 2.0 * cutoff + 1.0
        for k in range(3):
            if not pbc[k]:
                cell[k] = 0.0
                cell[k, k] = size
    i, j, shifts, distances = neighbour_list("ijSd", positions=positions, cell=cell, pbc=pbc, cutoff=float(cutoff))
    if distances.size and distances.min() < MIN_DISTANCE:
        e = int(np.argmin(distances))
        raise DataError(
            f"{frame.source}: atoms {int(i[e])} and {int(j[e])} are {distances[e]:.3g} Å apart (closer than "
            f"{MIN_DISTANCE} Å; every prediction on this frame would be NaN)"
        )
    shifts = np.where(pbc[None, :], shifts, 0)
    return i.astype(np.int32), j.astype(np.int32), shifts.astype(np.int64)


def frame_to_graph(frame: Frame, atomic_numbers: Sequence[int], cutoff: float) -> jraph.GraphsTuple:
    """One frame as a single-graph `jraph.GraphsTuple` of numpy arrays."""
    species = species_indices(frame, atomic_numbers)
    receivers, senders, shifts = neighbour_edges(frame, cutoff)
    n = frame.num_atoms

    def label(value, shape):
        return (np.zeros(shape), 0.0) if value is None else (np.asarray(value, dtype=np.float64), 1.0)

    forces, w_f = label(frame.forces, (n, 3))
    stress, w_s = label(frame.stress, (3, 3))
    energy = 0.0 if frame.energy is None else float(frame.energy)
    w_e = 0.0 if frame.energy is None else 1.0
    if forces.shape != (n, 3):
        raise DataError(f"{frame.source}: forces have shape {forces.shape}, expected ({n}, 3)")
    for name, value in (("energy", np.asarray(energy)), ("forces", forces), ("stress", stress)):
        if not np.all(np.isfinite(value)):
            raise DataError(f"{frame.source}: {name} label contains NaN or inf")
    return jraph.GraphsTuple(
        nodes={
            "positions": np.asarray(frame.positions, dtype=np.float64),
            "species": species,
            "forces": forces,
        },
        edges={"shifts": shifts.astype(np.float64)},
        senders=senders,
        receivers=receivers,
        globals={
            "cell": np.asarray(frame.cell, dtype=np.float64)[None],
            "energy": np.array([energy]),
            "stress": stress[None],
            "energy_weight": np.array([w_e]),
            "forces_weight": np.array([w_f]),
            "stress_weight": np.array([w_s if frame.periodic else 0.0]),
        },
        n_node=np.array([n], dtype=np.int32),
        n_edge=np.array([len(senders)], dtype=np.int32),
    )


@dataclasses.dataclass(frozen=True)
class GraphBudget:
    """Padded sizes of a batch: one jit compilation per distinct budget.

    n_node and n_edge include room for the padding graph; n_graph counts it.
    """

    n_node: int
    n_edge: int
    n_graph: int

    @staticmethod
    def round_up(
        n_node: int, n_edge: int, n_graph: int, granularity: float = 1.25, edge_granularity: float | None = None
    ) -> "GraphBudget":
        """The smallest budget on a geometric grid (ratio `granularity`; for
        edges `edge_granularity`, default the same) that fits.

        A grid keeps the number of distinct budgets (and compilations) small
        over an epoch of mixed-size frames; a finer edge grid pads less.
        """

        def grid(x: int, start: int = 8, granularity: float = granularity) -> int:
            value = start
            while value < x:
                value = int(np.ceil(value * granularity))
            return value

        edges = granularity if edge_granularity is None else edge_granularity
        return GraphBudget(grid(n_node + 1), grid(n_edge + 1, granularity=edges), grid(n_graph + 1, start=2))

    def at_most(self, cap: "GraphBudget | None") -> "GraphBudget":
        """This budget, each size lowered to `cap`'s where that is smaller (None: unchanged)."""
        if cap is None:
            return self
        return GraphBudget(min(self.n_node, cap.n_node), min(self.n_edge, cap.n_edge), min(self.n_graph, cap.n_graph))

    @staticmethod
    def fitting_any(graphs: Sequence[jraph.GraphsTuple], size: int) -> "GraphBudget":
        """The smallest budget that fits any `size` of these single-frame graphs, repeats
        allowed (the trainer fills a short batch with copies of its frames)."""
        n_node = max(int(g.n_node[0]) for g in graphs)
        n_edge = max(int(g.n_edge[0]) for g in graphs)
        return GraphBudget(size * n_node + 1, size * n_edge, size + 1)


def batch_graphs(graphs: Sequence[jraph.GraphsTuple], budget: GraphBudget | None = None) -> jraph.GraphsTuple:
    """Concatenate graphs and pad them to `budget` (default: rounded up).

    The padding graph's nodes and edges are its own, so it never touches a
    real graph; `jraph.get_graph_padding_mask` tells it apart.
    """
    batch = jraph.batch_np(list(graphs))
    n_node, n_edge, n_graph = int(batch.n_node.sum()), int(batch.n_edge.sum()), len(graphs)
    if budget is None:
        budget = GraphBudget.round_up(n_node, n_edge, n_graph)
    if n_node >= budget.n_node or n_edge > budget.n_edge or n_graph >= budget.n_graph:
        raise DataError(
            f"batch of {n_graph} graphs with {n_node} nodes and {n_edge} edges does not fit the padding "
            f"budget {budget}; reduce the batch size or raise the budget"
        )
    return jraph.pad_with_graphs(batch, budget.n_node, budget.n_edge, budget.n_graph)
