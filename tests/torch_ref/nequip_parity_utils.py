"""Shared pieces of the torch-parity tests: frames, batched JAX predictions, deviations, rotation equivariance."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np

from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import batch_graphs, frame_to_graph
from sparse_eqv.data.readers import read_frames
from sparse_eqv.models import build_model
from sparse_eqv.potential import energy_forces_stress


def real_frames(real_frames_dir, cu: int = 1, sse: int = 1, aspirin: int = 1) -> list[Frame]:
    """Cu fcc (108 atoms, periodic), Li10GeP2S12 (50 atoms, periodic), aspirin (21 atoms, open)."""
    frames = read_frames(real_frames_dir / "cu" / "mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz")[:cu]
    frames += read_frames(real_frames_dir / "sse-pbe" / "LiGePS-iter.000000-data.000")[:sse]
    frames += read_frames(real_frames_dir / "rmd17" / "rmd17_aspirin_test_01.npz")[:aspirin]
    return frames


def rotated(frame: Frame, seed: int = 0) -> Frame:
    """The frame under a random proper rotation (positions, cell and labels dropped)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    rot = q * np.sign(np.linalg.det(q))
    return dataclasses.replace(
        frame, positions=frame.positions @ rot.T, cell=frame.cell @ rot.T, energy=None, forces=None, stress=None
    ), rot


def assert_rotation_equivariant(config: dict, variables: dict, frames: list[Frame], tol: dict[str, float]) -> None:
    """The converted model on randomly rotated frames: energy unchanged, forces and
    stress rotated, within the parity tolerances `tol` (eV/atom, eV/Å, eV/Å^3)."""
    turned = [rotated(f, seed=i) for i, f in enumerate(frames)]
    base = jax_predict(config, variables, frames)
    rot = jax_predict(config, variables, [f for f, _ in turned])
    # tolerances as parity: the CG blocks a checkpoint stores (and the torch model uses)
    # are float32-rounded, which bends equivariance at ~1e-10 eV/atom; a real bug is O(1)
    for (frame, r), a, b in zip(turned, base, rot):
        assert abs(a["energy"] - b["energy"]) / frame.num_atoms < tol["energy_per_atom"]
        np.testing.assert_allclose(b["forces"], a["forces"] @ r.T, atol=tol["forces"])
        if frame.periodic:
            np.testing.assert_allclose(b["stress"], r @ a["stress"] @ r.T, atol=tol["stress"])


def jax_predict(config: dict, variables: dict, frames: list[Frame], dtype=np.float64) -> list[dict]:
    """Predictions of the converted model on ONE padded batch of all frames."""
    predict = _jitted(json.dumps({k: v for k, v in config.items() if k not in ("torch_names", "source")}, sort_keys=True))
    graphs = [frame_to_graph(f, config["atomic_numbers"], config["r_max"]) for f in frames]
    batch = batch_graphs(graphs)
    if dtype != np.float64:
        batch = batch._replace(
            nodes={**batch.nodes, "positions": batch.nodes["positions"].astype(dtype)},
            edges={"shifts": batch.edges["shifts"].astype(dtype)},
            globals={**batch.globals, "cell": batch.globals["cell"].astype(dtype)},
        )
        variables = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), variables)
    out = predict(variables, batch)
    out = jax.tree_util.tree_map(np.asarray, out)
    results, start = [], 0
    for i, frame in enumerate(frames):
        n = frame.num_atoms
        results.append({
            "energy": float(out["energy"][i]),
            "forces": out["forces"][start : start + n].astype(np.float64),
            "stress": out["stress"][i].astype(np.float64) if frame.periodic else None,
        })
        start += n
    return results


@functools.lru_cache(maxsize=None)
def _jitted(config_json: str):
    """One jitted predictor per architecture: models and batches of equal shapes share a compilation."""
    model = build_model(json.loads(config_json))
    return jax.jit(lambda variables, graph: energy_forces_stress(model.apply, variables, graph))


def deviations(frames: list[Frame], ours: list[dict], reference: list[dict]) -> dict[str, float]:
    """max |dE|/atom (eV), max |dF| (eV/Å), max |dstress| (eV/Å^3, periodic frames) over frames."""
    de = max(abs(a["energy"] - b["energy"]) / f.num_atoms for f, a, b in zip(frames, ours, reference))
    df = max(float(np.abs(a["forces"] - b["forces"]).max()) for a, b in zip(ours, reference))
    ds = max(
        [float(np.abs(a["stress"] - b["stress"]).max()) for f, a, b in zip(frames, ours, reference) if f.periodic],
        default=0.0,
    )
    return {"energy_per_atom": de, "forces": df, "stress": ds}


ELEMENTS = ["Cu", "Li", "Ge", "P", "S", "C", "H", "O"]
ZBL = {"_target_": "nequip.nn.pair_potential.ZBL", "units": "metal", "chemical_species": ELEMENTS}


def small_config(dtype: str = "float64") -> dict:
    """3 layers, l_max 2 with parity, per-type avg_num_neighbors, ZBL, a hidden readout layer."""
    return {
        "_target_": "nequip.model.NequIPGNNModel",
        "seed": 1, "model_dtype": dtype, "type_names": ELEMENTS, "r_max": 4.5,
        "num_layers": 3, "l_max": 2, "parity": True, "num_features": [8, 4, 2],
        "radial_mlp_depth": 2, "radial_mlp_width": 16, "polynomial_cutoff_p": 5,
        "avg_num_neighbors": {e: 10.0 + 3 * i for i, e in enumerate(ELEMENTS)},
        "per_type_energy_scales": {e: 1.0 for e in ELEMENTS},
        "per_type_energy_shifts": {e: 0.0 for e in ELEMENTS},
        "readout_mlp_hidden_layers_depth": 1, "readout_mlp_hidden_layers_width": 6,
        "pair_potential": ZBL,
    }
