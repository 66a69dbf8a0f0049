"""ASE calculator over a model directory or a fine-tuning run directory."""

from __future__ import annotations

from pathlib import Path

import jraph
import numpy as np
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from sparse_eqv.checkpoint import load_for_inference
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph
from sparse_eqv.inference import Predictor


class Calculator(AseCalculator):
    """Energy (eV), forces (eV/Å) and stress (eV/Å^3) from a sparse_eqv model.

    The neighbour list is built with a cutoff of r_max + `skin` and reused
    while no atom has moved more than skin/2 since it was built (and the
    cell, periodicity and elements are unchanged); every call keeps the
    listed pairs that are within r_max now, which are exactly the pairs a
    fresh list would hold. The padding budget is the skin list's length
    rounded up on a geometric grid (ratio 1.25) and kept while later lists
    fit it, so a long MD run compiles only a few times (`compilations`);
    `rebuilds` counts neighbour-list builds.

    Args:
        path: model directory (from `sparse-eqv convert`) or run directory
            (from `sparse-eqv finetune`: its best epoch).
        skin: extra neighbour-list radius, Å.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, path: str | Path, skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        config, variables = load_for_inference(path)
        self.predictor = Predictor(config, variables)
        self.skin = float(skin)
        self.rebuilds = 0
        self._listed: jraph.GraphsTuple | None = None  # the skin list's graph
        self._reference: Frame | None = None  # the geometry it was built for
        self._budget: GraphBudget | None = None

    @property
    def compilations(self) -> int:
        """Distinct padding budgets seen, i.e. compilations of the prediction."""
        return len(self.predictor.budgets)

    def _needs_new_list(self, frame: Frame) -> bool:
        ref = self._reference
        if ref is None or ref.num_atoms != frame.num_atoms:
            return True
        if not (np.array_equal(ref.cell, frame.cell) and np.array_equal(ref.pbc, frame.pbc)
                and np.array_equal(ref.numbers, frame.numbers)):
            return True
        return float(np.linalg.norm(frame.positions - ref.positions, axis=1).max()) > 0.5 * self.skin

    def _within_cutoff(self, frame: Frame) -> jraph.GraphsTuple:
        """The skin list's graph at `frame`'s positions, with only the pairs within r_max."""
        graph = self._listed
        shifts = graph.edges["shifts"]
        vectors = frame.positions[graph.senders] - frame.positions[graph.receivers] + shifts @ frame.cell
        keep = np.linalg.norm(vectors, axis=1) < self.predictor.cutoff
        return graph._replace(
            nodes={**graph.nodes, "positions": frame.positions},
            edges={"shifts": shifts[keep]},
            senders=graph.senders[keep],
            receivers=graph.receivers[keep],
            n_edge=np.array([int(keep.sum())], dtype=np.int32),
        )

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        frame = Frame(
            numbers=atoms.numbers.copy(),
            positions=np.array(atoms.positions, dtype=np.float64),
            cell=np.array(atoms.cell.array, dtype=np.float64),
            pbc=atoms.pbc.copy(),
            source="ase.Atoms",
        )
        if self._needs_new_list(frame):
            self._listed = frame_to_graph(frame, self.predictor.atomic_numbers, self.predictor.cutoff + self.skin)
            self._reference = frame
            self.rebuilds += 1
            n_listed = int(self._listed.n_edge[0])
            budget = self._budget
            if budget is None or n_listed > budget.n_edge or frame.num_atoms >= budget.n_node:
                self._budget = GraphBudget.round_up(frame.num_atoms, n_listed, 1)
        out = self.predictor.predict_graph(batch_graphs([self._within_cutoff(frame)], self._budget))
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"][: frame.num_atoms].astype(np.float64),
        }
        if frame.periodic:
            stress = np.asarray(out["stress"][0], dtype=np.float64)
            self.results["stress"] = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
