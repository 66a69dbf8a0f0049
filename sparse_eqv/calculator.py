"""ASE calculator over a model directory or a fine-tuning run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import all_changes

from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph
from sparse_eqv.inference import Predictor


class Calculator(AseCalculator):
    """Energy (eV), forces (eV/Å) and stress (eV/Å^3) from a sparse_eqv model.

    The neighbour list is built with a cutoff of r_max + `skin` and reused
    while no atom has moved more than skin/2 and the cell is unchanged; edges
    beyond r_max contribute exactly zero (every model's radial envelope
    vanishes there). Padding budgets come from a geometric grid, so a long
    MD run compiles only a handful of times (`compilations`).

    Args:
        path: model directory (from `sparse-eqv convert`) or run directory.
        skin: extra neighbour-list radius, Å.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, path: str | Path, skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        from sparse_eqv.checkpoint import load_for_inference

        config, variables = load_for_inference(path)
        self.predictor = Predictor(config, variables)
        self.skin = float(skin)
        self._graph = None
        self._reference_positions: np.ndarray | None = None
        self._reference_cell: np.ndarray | None = None
        self._budget: GraphBudget | None = None

    @property
    def compilations(self) -> int:
        return len(self.predictor.budgets)

    def _needs_new_list(self, atoms) -> bool:
        if self._graph is None or len(atoms) != len(self._reference_positions):
            return True
        if not np.array_equal(atoms.cell.array, self._reference_cell) or not np.array_equal(atoms.numbers, self._numbers):
            return True
        displacement = np.linalg.norm(atoms.positions - self._reference_positions, axis=1).max()
        return displacement > 0.5 * self.skin

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        frame = Frame(
            numbers=atoms.numbers.copy(),
            positions=atoms.positions.copy(),
            cell=atoms.cell.array.copy(),
            pbc=atoms.pbc.copy(),
            source="ase.Atoms",
        )
        if self._needs_new_list(atoms):
            graph = frame_to_graph(frame, self.predictor.atomic_numbers, self.predictor.cutoff + self.skin)
            n_edge = int(graph.n_edge[0])
            if self._budget is None or n_edge >= self._budget.n_edge or frame.num_atoms >= self._budget.n_node:
                self._budget = GraphBudget.round_up(frame.num_atoms, n_edge, 1)
            self._graph = batch_graphs([graph], self._budget)
            self._reference_positions = frame.positions
            self._reference_cell = frame.cell
            self._numbers = frame.numbers
        nodes = dict(self._graph.nodes)
        positions = np.array(nodes["positions"])
        positions[: frame.num_atoms] = frame.positions
        nodes["positions"] = positions
        out = self.predictor.predict_graph(self._graph._replace(nodes=nodes))
        energy = float(out["energy"][0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out["forces"][: frame.num_atoms],
        }
        if frame.periodic:
            stress = out["stress"][0]
            self.results["stress"] = np.array(
                [stress[0, 0], stress[1, 1], stress[2, 2], stress[1, 2], stress[0, 2], stress[0, 1]]
            )
