"""Magnetic-moment head: spin data, invariance/equivariance, training (STR
backbone + dense head), unchanged default outputs, export and reload.

Model: a tiny nequip checkpoint for Ni and O (random weights, written with
nequip itself so that export has a real torch base), converted once. Data:
a few frames of tests/data/nio-spin (antiferromagnetic NiO, DeePMD
spin.npy in μB)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sparse_eqv.checkpoint import load_model, save_model
from sparse_eqv.cli import main
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph
from sparse_eqv.data.readers import read_frames
from sparse_eqv.errors import DataError, UnsupportedModelError
from sparse_eqv.finetune import magmom as magmom_lib
from sparse_eqv.finetune.loop import TrainConfig
from sparse_eqv.finetune.losses import LossWeights
from sparse_eqv.finetune.run import MethodOptions, finetune, make_method
from sparse_eqv.models import build_model
from sparse_eqv.models.magmom import HEAD_KEY, head_config
from sparse_eqv.models.nequip import parse_irreps
from sparse_eqv.potential import edge_vectors
from weights_convert.convert import convert
from weights_convert.export import apply_delta, export_run
from weights_convert.magmom_head import read_head

NIO = "nio-spin"
TINY_NEQUIP = {
    "_target_": "nequip.model.NequIPGNNModel",
    "seed": 1, "model_dtype": "float64", "type_names": ["Ni", "O"], "r_max": 3.2,
    "num_layers": 2, "l_max": 1, "parity": True, "num_features": [4, 2],
    "radial_mlp_depth": 1, "radial_mlp_width": 8, "polynomial_cutoff_p": 5, "avg_num_neighbors": 8.0,
    "per_type_energy_scales": {"Ni": 1.0, "O": 1.0}, "per_type_energy_shifts": {"Ni": 0.0, "O": 0.0},
}


def deepmd_subset(source: Path, target: Path, frames: list[int]) -> Path:
    """A DeePMD system with some frames of `source` (every npy, spin.npy included)."""
    (target / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        shutil.copy(source / name, target / name)
    for array in (source / "set.000").glob("*.npy"):
        np.save(target / "set.000" / array.name, np.load(array)[frames])
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_frames_dir):
    """The converted tiny model (dir, torch base file) and NiO train/valid subsets."""
    from torch_ref import nequip_reference

    root = tmp_path_factory.mktemp("magmom")
    base_file = nequip_reference.write_checkpoint(root / "base.ckpt", TINY_NEQUIP)
    config, variables = convert(base_file)
    save_model(root / "model", config, variables)
    # frames 0, 20, 40, 59 of data_0 and 0, 30 of data_2 (the fixtures hold just these)
    deepmd_subset(real_frames_dir / NIO / "data_0", root / "train", [0, 1, 2, 3])
    deepmd_subset(real_frames_dir / NIO / "data_2", root / "valid", [0, 1])
    return root, base_file


@pytest.fixture(scope="module")
def run(setup):
    """STR on the backbone + a scalar head, 2 epochs x 4 steps."""
    root, _ = setup
    metrics = finetune(
        root / "model", root / "run", train=root / "train", valid=root / "valid",
        method=MethodOptions("str"), magmom="scalar", progress=False,
        config=TrainConfig(epochs=2, batch_size=1, lr=0.05, dense_lr=0.1, seed=1, weights=LossWeights(magmoms=10.0)),
    )
    return root / "run", metrics


@pytest.fixture(scope="module")
def predict():
    """A jitted forward pass (node energies, moments) per architecture: no
    forces, so it compiles quickly; models that differ only in their files
    share it."""
    cache = {}

    def fn(config, variables, graph):
        key = json.dumps({k: v for k, v in config.items() if k not in ("source", "finetuned")}, sort_keys=True)
        if key not in cache:
            module = build_model(config)

            def forward(variables, graph):
                vectors = edge_vectors(graph.nodes["positions"], jnp.zeros((graph.n_node.shape[0], 3, 3)), graph)
                out = module.apply(variables, vectors, graph.nodes["species"], graph.senders, graph.receivers)
                energies, extra = out if isinstance(out, tuple) else (out, {})
                return {"node_energies": energies, **extra}

            cache[key] = jax.jit(forward)
        return jax.tree.map(np.asarray, cache[key](variables, graph))

    return fn


def graph_of(frames: list[Frame], config: dict):
    """Up to two frames, padded to one budget (one compilation per model)."""
    graphs = [frame_to_graph(f, config["atomic_numbers"], config["r_max"]) for f in frames]
    return batch_graphs(graphs, GraphBudget(72, 1600, 3))


# ------------------------------------------------------------------ data


def test_spin_reader(real_frames_dir, tmp_path):
    path = real_frames_dir / NIO / "data_0"
    frames = read_frames(path)
    spin = np.load(path / "set.000" / "spin.npy")
    assert len(frames) == spin.shape[0] == 4 and spin.shape[1] == 3 * 32  # frames 0, 20, 40, 59 of data_0
    for i in range(4):
        assert frames[i].magmoms.shape == (32, 3)
        np.testing.assert_array_equal(frames[i].magmoms, spin[i].reshape(32, 3))
        norms = np.linalg.norm(frames[i].magmoms, axis=1)
        oxygen = frames[i].numbers == 8
        assert np.all(norms[oxygen] == 0.0)
        assert np.all((norms[~oxygen] > 1.0) & (norms[~oxygen] < 2.0))  # Ni, μB
    bad = deepmd_subset(path, tmp_path / "bad", [0, 1])
    np.save(bad / "set.000" / "spin.npy", spin[:2, :-3])
    with pytest.raises(DataError, match=r"spin\.npy.*fit 32 atoms"):
        read_frames(bad)


def test_extxyz_moments_keys(tmp_path):
    atoms = Frame(np.array([28, 8]), np.array([[0.0, 0, 0], [2.0, 0, 0]]), np.zeros((3, 3)), np.zeros(3, bool)).to_atoms()
    atoms.set_initial_magnetic_moments([1.5, 0.0])
    atoms.arrays["moments_dft"] = np.array([[0.0, 0, 1.2], [0, 0, 0.1]])
    ase.io.write(tmp_path / "a.xyz", atoms, format="extxyz")
    assert read_frames(tmp_path / "a.xyz")[0].magmoms is None
    np.testing.assert_allclose(read_frames(tmp_path / "a.xyz", magmoms_key="initial_magmoms")[0].magmoms, [1.5, 0])
    assert read_frames(tmp_path / "a.xyz", magmoms_key="moments_dft")[0].magmoms.shape == (2, 3)
    atoms.arrays["moments_dft"] = np.ones((2, 2))
    ase.io.write(tmp_path / "b.xyz", atoms, format="extxyz")
    with pytest.raises(DataError, match=r"b\.xyz:0: magnetic moments have shape \(2, 2\)"):
        read_frames(tmp_path / "b.xyz", magmoms_key="moments_dft")
    collinear = read_frames(tmp_path / "a.xyz", magmoms_key="initial_magmoms")[0]
    with pytest.raises(DataError, match="collinear"):
        magmom_lib.target(collinear, "vector")


# ----------------------------------------------------------- the head itself


def with_head(config: dict, variables, kind: str, seed: int = 0):
    """(config, variables) of the model with a fresh head of `kind`."""
    config = {**config, "magmom": head_config(build_model(config).feature_irreps(), kind)}
    head = build_model(config).init_head(jax.random.PRNGKey(seed))
    return config, {**variables, "params": {**variables["params"], HEAD_KEY: head}}


def rotated(frame: Frame, rotation: np.ndarray) -> Frame:
    return Frame(frame.numbers, frame.positions @ rotation.T, frame.cell @ rotation.T, frame.pbc, source="rotated")


def test_scalar_invariant_vector_equivariant(setup, real_frames_dir, predict):
    root, _ = setup
    config, variables = load_model(root / "model")
    frame = read_frames(root / "valid")[0]
    rng = np.random.default_rng(0)
    # a rattled frame: NiO's ideal sites have (almost) no l=1 features to read
    frame = Frame(frame.numbers, frame.positions + rng.normal(0, 0.1, frame.positions.shape), frame.cell, frame.pbc)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rotation = q * np.sign(np.linalg.det(q))
    n = frame.num_atoms
    for kind in ("scalar", "vector"):
        cfg, var = with_head(config, variables, kind)
        out = predict(cfg, var, graph_of([frame, rotated(frame, rotation)], cfg))
        m, m_rot = out["magmoms"][:n], out["magmoms"][n : 2 * n]
        scale = np.abs(m).max()  # (the random tiny model's l=1 features are small: compare relatively)
        assert scale > 1e-12 and np.ptp(m) > 1e-3 * scale, kind  # not zero, not one value
        expected = m if kind == "scalar" else m @ rotation.T
        np.testing.assert_allclose(m_rot, expected, rtol=0, atol=1e-9 * scale)
        if kind == "vector":
            assert m.shape == (n, 3) and np.abs(m_rot - m).max() > 0.1 * scale  # it did rotate


def test_vector_head_needs_l1_features():
    with pytest.raises(UnsupportedModelError, match="l=1"):
        head_config(("8x0e", "8x0e"), "vector")
    with pytest.raises(UnsupportedModelError, match="known: scalar, vector"):
        head_config(("8x0e",), "tensor")


def test_default_outputs_unchanged(setup, predict):
    """No head configured: the backbone returns node energies only, the same
    numbers it returns beside its features, and a model with a head returns
    them beside its moments."""
    root, _ = setup
    config, variables = load_model(root / "model")
    module = build_model(config)
    graph = graph_of(read_frames(root / "valid")[:1], config)
    vectors = jnp.asarray(np.random.default_rng(1).normal(size=(graph.senders.shape[0], 3)))
    args = (vectors, graph.nodes["species"], graph.senders, graph.receivers)
    plain, (energies, features) = jax.jit(
        lambda v: (module.apply(v, *args), module.clone(return_features=True).apply(v, *args))
    )(variables)
    assert isinstance(plain, jax.Array) and plain.shape == (graph.n_node.sum(),)
    np.testing.assert_array_equal(plain, energies)
    assert [f.shape[1] for f in features] == [
        sum(m * (2 * l + 1) for m, l, _ in parse_irreps(irreps)) for irreps in module.feature_irreps()
    ]
    head_cfg, head_vars = with_head(config, variables, "scalar")
    with_moments = predict(head_cfg, head_vars, graph)
    np.testing.assert_allclose(with_moments["node_energies"], predict(config, variables, graph)["node_energies"],
                               rtol=0, atol=1e-12)
    assert "magmoms" not in predict(config, variables, graph) and with_moments["magmoms"].shape == plain.shape


# ----------------------------------------------------------- training


def test_head_is_dense_backbone_gets_str_labels(setup):
    root, _ = setup
    config, variables = load_model(root / "model")
    cfg, model, params, head = magmom_lib.prepare(config, variables["params"], "scalar", 0, np.float64)
    method = magmom_lib.WithMagmomHead(make_method(MethodOptions("str"), params, cfg), head)
    labels = method.labels(jax.eval_shape(method.init, params, jax.random.PRNGKey(0)))
    assert set(jax.tree.leaves(labels[HEAD_KEY])) == {"dense"}
    assert set(jax.tree.leaves(labels["base"])) == {"frozen"} and HEAD_KEY not in labels["base"]
    assert set(jax.tree.leaves(labels["delta"])) == {"delta"} and set(jax.tree.leaves(labels["score"])) == {"score"}


def test_training_lowers_moment_mae(run, setup, predict):
    run_dir, metrics = run
    root, _ = setup
    config, variables = load_model(root / "model")
    frames = read_frames(root / "valid")
    # the head the run started from (seeded), on the base backbone
    cfg, _, params, head = magmom_lib.prepare(config, variables["params"], "scalar", 1, np.float64)
    start = predict(cfg, {**variables, "params": {**params, HEAD_KEY: head}}, graph_of(frames, cfg))
    n = frames[0].num_atoms
    initial = magmom_lib.magmom_metrics(frames, [{"magmoms": start["magmoms"][i * n : (i + 1) * n]} for i in range(2)])
    final = metrics["valid"]["magmoms_mae"]
    assert final < 0.6 * initial["magmoms_mae"], (initial, final)
    log = (run_dir / "log.csv").read_text().splitlines()
    assert "valid_magmoms_mae" in log[0] and len(log) == 3
    assert json.loads((run_dir / "metrics.json").read_text())["valid"]["magmoms_mae"] == final

    # the run's model: STR deltas on targeted backbone leaves only, the whole head trained
    run_config, run_vars = load_model(run_dir / "model")
    assert run_config["magmom"]["kind"] == "scalar"
    base = traverse_util.flatten_dict(variables["params"])
    new = traverse_util.flatten_dict({k: v for k, v in run_vars["params"].items() if k != HEAD_KEY})
    targeted = {tuple(p.split("/")[1:]) for p in json.loads((run_dir / "run.json").read_text())["targeted_leaves"]}
    assert new.keys() == base.keys()
    for key in base:
        if key not in targeted:
            np.testing.assert_array_equal(new[key], base[key], err_msg=str(key))
    sparsity = json.loads((run_dir / "sparsity.json").read_text())["summary"]
    assert 0.0 < sparsity["total_sparsity"] < 1.0
    for before, after in zip(jax.tree.leaves(head), jax.tree.leaves(run_vars["params"][HEAD_KEY])):
        assert np.all(before != after)  # dense: every weight of the head moved


# ----------------------------------------------------------- export and reload


def test_patch_carries_head_and_reload_reproduces_moments(run, setup, predict, tmp_path):
    run_dir, _ = run
    _, base_file = setup
    patch, merged = tmp_path / "run.delta", tmp_path / "merged.ckpt"
    summary = export_run(run_dir, patch, delta_only=True)
    assert summary["magmom_head"] == str(patch)
    head_config_read, head_params = read_head(patch)
    run_config, run_vars = load_model(run_dir / "model")
    assert head_config_read == run_config["magmom"]
    for a, b in zip(jax.tree.leaves(head_params), jax.tree.leaves(run_vars["params"][HEAD_KEY])):
        np.testing.assert_array_equal(a, b)

    # the torch checkpoint holds the backbone; convert --magmom-head puts the head back
    assert apply_delta(base_file, patch, merged)["magmom_head"] == str(patch)
    assert main(["convert", str(merged), "-o", str(tmp_path / "reloaded"), "--magmom-head", str(patch)]) == 0
    config, variables = load_model(tmp_path / "reloaded")
    frames = read_frames(setup[0] / "valid")
    ours = predict(run_config, run_vars, graph_of(frames, run_config))
    reloaded = predict(config, variables, graph_of(frames, config))
    np.testing.assert_allclose(reloaded["magmoms"], ours["magmoms"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(reloaded["node_energies"], ours["node_energies"], rtol=0, atol=1e-8)

    # a merged export writes the head beside the checkpoint
    summary = export_run(run_dir, tmp_path / "ft.ckpt")
    assert summary["magmom_head"] == str(tmp_path / "ft.ckpt.magmom")
    assert read_head(tmp_path / "ft.ckpt.magmom")[0] == run_config["magmom"]
    assert read_head(tmp_path / "ft.ckpt") is None  # the torch checkpoint (a zip too) has no head inside
