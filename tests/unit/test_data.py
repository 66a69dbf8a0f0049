"""Readers (units, formats), neighbour lists and padding; bad input gives one clear error."""

from __future__ import annotations

import dataclasses

import ase.io
import ase.neighborlist
import numpy as np
import pytest

from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph, neighbour_edges
from sparse_eqv.data.readers import KCAL_PER_MOL, read_frames
from sparse_eqv.errors import DataError


def test_rmd17_units(real_frames_dir):
    path = real_frames_dir / "rmd17" / "rmd17_aspirin_test_01.npz"
    frames = read_frames(path)
    raw = np.load(path)
    assert len(frames) == len(raw["energies"]) == 9 and frames[0].num_atoms == 21
    assert frames[3].energy == pytest.approx(raw["energies"][3] * KCAL_PER_MOL)
    assert frames[3].energy == pytest.approx(-17600, rel=0.01)  # eV, total energy (README)
    np.testing.assert_allclose(frames[3].forces, raw["forces"][3] * 0.0433641, rtol=1e-5)
    assert not frames[0].periodic


def test_deepmd_virial_becomes_stress(real_frames_dir):
    system = real_frames_dir / "sse-pbe" / "LiGePS-iter.000000-data.000"
    frames = read_frames(system)
    virial = np.load(next(system.glob("set.000")) / "virial.npy")[0].reshape(3, 3)
    frame = frames[0]
    assert sorted(set(frame.numbers)) == [3, 15, 16, 32]
    np.testing.assert_allclose(frame.stress * abs(np.linalg.det(frame.cell)), -virial)


def test_mlearn_json_stress_sign_and_units(real_frames_dir):
    frames = read_frames(real_frames_dir / "cu" / "mlearn_Cu_test.json")
    assert len(frames) == 8  # records 0-7 of the 31
    # the vacancy record reports +29.69 kbar (VASP: positive = compressive) -> ASE sign negative
    assert frames[0].stress[0, 0] == pytest.approx(-29.69410623 * 0.1 / 160.21766208, rel=1e-6)


def test_extxyz_labels(real_frames_dir):
    frames = read_frames(real_frames_dir / "cu" / "mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz")
    assert len(frames) == 4 and frames[0].num_atoms == 108  # frames 0, 1, 2, 60 of the 100
    assert frames[0].energy == pytest.approx(-405.16632682)
    assert frames[0].stress.shape == (3, 3)


def test_neighbour_list_matches_ase(real_frames_dir):
    frame = read_frames(real_frames_dir / "cu" / "mlearn_Cu_test.json")[5]
    receivers, senders, shifts = neighbour_edges(frame, 4.0)
    i, j, s = ase.neighborlist.neighbor_list("ijS", frame.to_atoms(), 4.0)
    ours = sorted(zip(receivers, senders, map(tuple, shifts)))
    theirs = sorted(zip(i, j, map(tuple, s)))
    assert ours == theirs


def test_padding_budget_bounds_shapes(real_frames_dir):
    frames = read_frames(real_frames_dir / "rmd17" / "rmd17_ethanol_test_01.npz")[:5]
    graphs = [frame_to_graph(f, [1, 6, 8], 5.0) for f in frames]
    batch = batch_graphs(graphs)
    budget = GraphBudget.round_up(sum(f.num_atoms for f in frames), sum(int(g.n_edge[0]) for g in graphs), 5)
    assert int(batch.n_node.sum()) == budget.n_node and len(batch.n_node) == budget.n_graph
    with pytest.raises(DataError, match="budget"):
        batch_graphs(graphs, GraphBudget(10, 10, 2))


def test_budget_cap_fits_every_batch_and_trims_the_grid(real_frames_dir):
    frames = read_frames(real_frames_dir / "cu" / "mlearn_Cu_test.json")
    graphs = [frame_to_graph(f, [29], 5.0) for f in frames]
    cap = GraphBudget.fitting_any(graphs, 4)
    largest = [max(graphs, key=lambda g: int(g.n_edge[0]))] * 4  # a short batch filled with copies of its frame
    assert cap.n_edge == sum(int(g.n_edge[0]) for g in largest) and cap.n_graph == 5
    assert cap.n_node == 4 * max(int(g.n_node[0]) for g in graphs) + 1
    rng = np.random.default_rng(0)
    for replace in [False] * 10 + [True] * 10:
        batch = [graphs[i] for i in rng.choice(len(graphs), 4, replace=replace)]
        grid = GraphBudget.round_up(sum(int(g.n_node[0]) for g in batch), sum(int(g.n_edge[0]) for g in batch), 4)
        budget = grid.at_most(cap)
        assert budget.n_node <= grid.n_node and budget.n_edge <= grid.n_edge
        padded = batch_graphs(batch, budget)
        assert int(padded.n_node.sum()) == budget.n_node
    grid = GraphBudget.round_up(sum(int(g.n_node[0]) for g in largest), sum(int(g.n_edge[0]) for g in largest), 4)
    assert grid.at_most(cap) == cap != grid  # the largest batch: padded by one node, not to the grid
    batch_graphs(largest, grid.at_most(cap))
    assert grid.at_most(None) == grid


def test_unknown_element_names_element_and_frame(real_frames_dir):
    frame = read_frames(real_frames_dir / "rmd17" / "rmd17_aspirin_test_01.npz")[7]
    with pytest.raises(DataError, match=r"rmd17_aspirin_test_01.npz:7: element O \(Z=8\)"):
        frame_to_graph(frame, [1, 6], 5.0)


def test_nan_position_is_refused(tmp_path, real_frames_dir):
    atoms = read_frames(real_frames_dir / "cu" / "mlearn_Cu_test.json")[0].to_atoms()
    atoms.positions[3, 1] = np.nan
    atoms.info["energy"] = -1.0
    ase.io.write(tmp_path / "bad.extxyz", [atoms.copy(), atoms], format="extxyz")
    with pytest.raises(DataError, match=r"bad.extxyz:0: position of atom 3 is not finite"):
        read_frames(tmp_path / "bad.extxyz")


def test_missing_energy_key_lists_keys(tmp_path, real_frames_dir):
    src = real_frames_dir / "cu" / "mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz"
    with pytest.raises(DataError, match=r":0: no energy under key 'REF_energy'; scalar keys present: .*energy.*free_energy"):
        read_frames(src, energy_key="REF_energy", require_energy=True)


def test_forces_shape_mismatch(real_frames_dir):
    frame = read_frames(real_frames_dir / "cu" / "mlearn_Cu_test.json")[0]
    bad = dataclasses.replace(frame, forces=frame.forces[:-1])
    with pytest.raises(DataError, match="forces have shape"):
        frame_to_graph(bad, [29], 4.0)


def test_deepmd_force_of_wrong_size(tmp_path, real_frames_dir):
    source = real_frames_dir / "sse-pbe" / "LiGePS-iter.000000-data.000"
    system = tmp_path / "system"
    (system / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        (system / name).write_text((source / name).read_text())
    for name in ("box", "coord", "energy"):
        np.save(system / "set.000" / f"{name}.npy", np.load(source / "set.000" / f"{name}.npy")[:3])
    np.save(system / "set.000" / "force.npy", np.load(source / "set.000" / "force.npy")[:3, :-3])
    with pytest.raises(DataError, match=r"force.npy: shape \(3, 147\) does not fit 50 atoms"):
        read_frames(system)
