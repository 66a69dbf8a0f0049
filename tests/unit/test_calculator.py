"""The ASE calculator (`sparse_eqv.calculator.Calculator`) on the tiny
SevenNet-architecture model of test_finetune: same numbers as the Predictor,
forces and stress are derivatives of its energy, neighbour-list reuse is
exact, MD compiles a bounded number of times, run directories work."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from sparse_eqv.calculator import Calculator
from sparse_eqv.checkpoint import load_model, save_model
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import batch_graphs, frame_to_graph
from sparse_eqv.inference import Predictor
from sparse_eqv.models import build_model
from sparse_eqv.testing import tiny_sevenn_config

# r_max 4.0 Å: the Li-Li and S-S shells of Li2S at a / sqrt(2) = 4.04 Å sit just outside.
CONFIG = {**tiny_sevenn_config(), "r_max": 4.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model with random weights (float64; unmasked polynomial
    envelope, so pairs beyond r_max would change the energy)."""
    directory = tmp_path_factory.mktemp("calculator") / "model"
    module = build_model(CONFIG)
    vectors = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    variables = module.init(jax.random.PRNGKey(1), vectors, np.array([0, 2], np.int32), np.array([0, 1, 0]),
                            np.array([1, 0, 1]))
    save_model(directory, CONFIG, jax.tree.map(np.asarray, variables))
    return directory


def li2s(seed: int = 0, rattle: float = 0.05):
    """Antifluorite Li2S, 12 atoms (elements of the tiny model), rattled."""
    atoms = bulk("SLi2", "fluorite", a=5.71, cubic=True)
    atoms.positions += np.random.default_rng(seed).normal(0.0, rattle, atoms.positions.shape)
    return atoms


def reference(model_dir, atoms, budget=None) -> dict:
    """A new Predictor on a fresh neighbour list (within r_max); padded to
    `budget` (the calculator's: the same compiled function) when given."""
    frame = Frame(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)
    predictor = Predictor(*load_model(model_dir))
    if budget is None:
        return predictor.predict([frame])[0]
    out = predictor.predict_graph(batch_graphs([predictor.graph(frame)], budget))
    return {"energy": float(out["energy"][0]), "forces": out["forces"][: len(atoms)], "stress": out["stress"][0]}


def test_results_equal_the_predictor(model_dir):
    atoms = li2s()
    atoms.calc = Calculator(model_dir)
    ref = reference(model_dir, atoms)
    assert abs(atoms.get_potential_energy() - ref["energy"]) <= 1e-12 * len(atoms)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), ref["stress"], atol=1e-14)
    assert np.abs(atoms.get_forces()).max() > 1e-3  # a test that can fail


def test_forces_and_stress_are_derivatives_of_the_energy(model_dir):
    atoms = li2s(seed=1)
    atoms.calc = Calculator(model_dir, skin=1.0)
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    h = 1e-4
    for atom, axis in [(0, 0), (3, 1), (7, 2), (11, 0)]:
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.calc = atoms.calc
            moved.positions[atom, axis] += sign * h
            energies.append(moved.get_potential_energy())
        assert abs(-(energies[0] - energies[1]) / (2 * h) - forces[atom, axis]) < 1e-7
    volume = atoms.get_volume()
    for i, j in [(0, 0), (1, 2), (2, 2), (0, 1)]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += 0.5 * sign * h
            strain[j, i] += 0.5 * sign * h
            strained = atoms.copy()
            strained.calc = atoms.calc
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            energies.append(strained.get_potential_energy())
        assert abs((energies[0] - energies[1]) / (2 * h) / volume - stress[i, j]) < 1e-8


def test_neighbour_list_reuse_within_the_skin_is_exact(model_dir):
    atoms = li2s(seed=2)
    calc = Calculator(model_dir, skin=0.6)
    atoms.calc = calc
    atoms.get_potential_energy()
    step = np.random.default_rng(3).normal(size=atoms.positions.shape)
    step *= 0.29 / np.linalg.norm(step, axis=1).max()  # every atom moves less than skin / 2
    atoms.positions += step
    numbers, r_max = CONFIG["atomic_numbers"], CONFIG["r_max"]
    before = frame_to_graph(Frame(atoms.numbers, atoms.positions - step, atoms.cell.array, atoms.pbc), numbers, r_max)
    after = frame_to_graph(Frame(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc), numbers, r_max)
    assert before.n_edge[0] != after.n_edge[0]  # pairs crossed r_max, so the kept pairs matter
    ref = reference(model_dir, atoms, calc._budget)
    assert abs(atoms.get_potential_energy() - ref["energy"]) <= 1e-12 * len(atoms)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], atol=1e-12)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), ref["stress"], atol=1e-14)
    assert calc.rebuilds == 1
    atoms.positions += step  # now beyond skin / 2: a new list
    atoms.get_potential_energy()
    assert calc.rebuilds == 2


def test_md_compiles_a_bounded_number_of_times(model_dir):
    atoms = li2s(seed=4) * (2, 1, 1)
    calc = Calculator(model_dir, skin=0.4)
    atoms.calc = calc
    thermalize_momenta(atoms, temperature_K=1000, rng=np.random.default_rng(5))
    energies = []
    dynamics = Langevin(atoms, 1.0 * units.fs, temperature_K=1000, friction=0.02, fixcm=False,
                        rng=np.random.default_rng(6))
    dynamics.attach(lambda: energies.append(atoms.get_potential_energy()))
    dynamics.run(100)
    assert len(energies) == 101 and np.all(np.isfinite(energies))
    assert calc.rebuilds >= 3  # the atoms moved well beyond the skin
    assert calc.compilations <= 3
    ref = reference(model_dir, atoms, calc._budget)
    assert abs(atoms.get_potential_energy() - ref["energy"]) <= 1e-12 * len(atoms)
    np.testing.assert_allclose(atoms.get_forces(), ref["forces"], atol=1e-12)


def test_run_directory_is_accepted(model_dir, tmp_path):
    """A run directory (run.json + model/) gives its fine-tuned model's numbers."""
    config, variables = load_model(model_dir)
    tuned = jax.tree.map(lambda x: x * 1.1 if np.issubdtype(x.dtype, np.floating) else x, variables)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": str(model_dir), "method": "str"}))
    save_model(run / "model", {**config, "finetuned": {"run": str(run), "method": "str"}}, tuned)
    atoms = li2s(seed=7)
    calc = Calculator(run)
    atoms.calc = calc
    ref = reference(run / "model", atoms, calc._budget)
    assert abs(atoms.get_potential_energy() - ref["energy"]) <= 1e-12 * len(atoms)
    assert abs(atoms.get_potential_energy() - reference(model_dir, atoms, calc._budget)["energy"]) > 1e-6


def test_predictor_pads_new_budgets_finely_and_reuses_compiled_ones(model_dir):
    """Predictor.batch: a new budget pads the edges by at most 5 % (PREDICT_EDGE_GRANULARITY);
    a smaller batch is padded to the budget already compiled (no new compilation), unless that
    budget is larger than the coarse grid's for it."""
    predictor = Predictor(*load_model(model_dir))
    frames = [Frame(a.numbers, a.positions, a.cell.array, a.pbc) for a in (li2s(1), li2s(0))]
    big, small = (predictor.graph(f) for f in frames)
    assert int(small.n_edge[0]) < int(big.n_edge[0])  # 148 < 154 pairs within r_max
    padded = predictor.batch([big])
    assert int(big.n_edge[0]) < padded.senders.shape[0] <= 1.05 * (int(big.n_edge[0]) + 1)
    energy = predictor.predict_graph(padded)["energy"][0]
    assert predictor.batch([small]).senders.shape == padded.senders.shape
    primitive = bulk("SLi2", "fluorite", a=5.71)  # 3 atoms: the 12-atom budget is beyond the coarse grid's for it
    tiny = predictor.graph(Frame(primitive.numbers, primitive.positions, primitive.cell.array, primitive.pbc))
    assert int(predictor.batch([tiny]).n_node.sum()) < int(padded.n_node.sum())
    results = [predictor.predict([frame])[0] for frame in frames]
    assert len(predictor.budgets) == 1
    assert abs(results[0]["energy"] - energy) <= 1e-12
