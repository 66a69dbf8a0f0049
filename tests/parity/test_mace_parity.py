"""The Flax MACE against the real mace-torch 0.3.16 (float64, CPU), on real frames.

`tests/torch_ref/mace_reference.py` runs in the MACE environment
(.venv-mace) once per session: it builds each architecture with mace's own
random initialisation, saves it as a `.model` file, loads it back and
predicts energy, forces and stress for a few real frames of tests/data. This
file converts each `.model` with `weights_convert.mace` (no torch) and
predicts the same frames, batched and padded, through
`sparse_eqv.potential.energy_forces_stress`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import zipfile
from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import batch_graphs, frame_to_graph
from sparse_eqv.data.readers import read_frames
from sparse_eqv.errors import CheckpointError, UnsupportedModelError
from sparse_eqv.models import build_model
from sparse_eqv.potential import energy_forces_stress
from weights_convert.mace import convert
from weights_convert.torch_pickle import load_checkpoint, module_state_dict

REFERENCE_SCRIPT = Path(__file__).parents[1] / "torch_ref" / "mace_reference.py"

# (file under tests/data, frame indices into it): a padded batch of several frames each.
# The comments give the frames' indices in the full files (tests/data/README.md).
FRAME_SETS = {
    "materials": [
        ("cu/mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz", [3]),  # frame 60; 108 atoms, periodic
        ("sse-pbe/LiGePS-iter.000000-data.000", [0, 6]),  # frames 0, 150; 50 atoms, periodic, Li Ge P S
    ],
    "organics": [
        ("rmd17/rmd17_aspirin_test_01.npz", [0, 8]),  # frames 0, 500
        ("rmd17/rmd17_paracetamol_test_01.npz", [0, 1]),  # frames 0, 500
    ],
}

# (architecture in mace_reference.ARCHITECTURES, frame set, head)
CASES = [
    ("mp0-medium", "materials", None),
    ("mp0b3-medium", "materials", None),
    ("mpa0-medium", "materials", None),
    ("off23-small", "organics", None),
    ("off23-medium", "organics", None),
    ("corr1", "organics", None),
    ("corr2", "materials", None),
    ("multihead", "materials", "DFT"),
]

E_TOL, F_TOL, S_TOL = 1e-8, 1e-7, 1e-8  # eV/atom, eV/Å, eV/Å^3
# XLA's CPU backend at LLVM opt level 0 compiles these graphs ~3x faster; results are the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _write_frames(real_frames_dir: Path, frame_set: str, path: Path) -> None:
    frames = []
    for name, indices in FRAME_SETS[frame_set]:
        available = read_frames(real_frames_dir / name)
        frames += [available[i] for i in indices]
    ase.io.write(path, [f.to_atoms() for f in frames], format="extxyz")


def _run_reference(mace_python: Path, jobs: list[dict], workdir: Path, timeout: int) -> None:
    jobs_file = workdir / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="2")
    result = subprocess.run(
        [str(mace_python), str(REFERENCE_SCRIPT), "--jobs", str(jobs_file)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mace reference failed:\n{result.stderr[-4000:]}")


@pytest.fixture(scope="session")
def references(tmp_path_factory, mace_python, real_frames_dir) -> Path:
    """Directory with <arch>.model and <arch>.npz for every case, plus the unsupported-*.model files."""
    root = tmp_path_factory.mktemp("mace_reference")
    for frame_set in FRAME_SETS:
        _write_frames(real_frames_dir, frame_set, root / f"{frame_set}.extxyz")
    jobs = [
        dict(arch=arch, seed=seed, model=str(root / f"{arch}.model"), frames=str(root / f"{frame_set}.extxyz"),
             out=str(root / f"{arch}.npz"), head=head)
        for seed, (arch, frame_set, head) in enumerate(CASES)
    ]
    jobs += [dict(arch=arch, seed=0, model=str(root / f"{arch}.model")) for arch in ("unsupported-att", "unsupported-radial")]
    _run_reference(mace_python, jobs, root, timeout=900)
    return root


def predict(config: dict, variables: dict, frames: Path | list[Frame], dtype=jnp.float64) -> dict[str, np.ndarray]:
    """Energy (G,), forces (N, 3), stress (G, 3, 3) of every frame, in one padded batch.

    Also "periodic" (G,): stress is only defined (and compared) for periodic frames.
    """
    if isinstance(frames, Path):
        frames = read_frames(frames)
    batch = batch_graphs([frame_to_graph(f, config["atomic_numbers"], config["r_max"]) for f in frames])
    batch = batch._replace(
        nodes={**batch.nodes, "positions": batch.nodes["positions"].astype(dtype)},
        edges={**batch.edges, "shifts": batch.edges["shifts"].astype(dtype)},
        globals={**batch.globals, "cell": batch.globals["cell"].astype(dtype)},
    )
    module = build_model(config)
    compiled = jax.jit(lambda v, g: energy_forces_stress(module.apply, v, g)).lower(variables, batch).compile(FAST_COMPILE)
    out = compiled(variables, batch)
    n_graphs, n_nodes = len(frames), sum(f.num_atoms for f in frames)
    return {
        "energy": np.asarray(out["energy"])[:n_graphs],
        "forces": np.asarray(out["forces"])[:n_nodes],
        "stress": np.asarray(out["stress"])[:n_graphs],
        "periodic": np.array([f.periodic for f in frames]),
    }


def errors(prediction: dict, reference) -> dict[str, float]:
    n_atoms, periodic = reference["n_atoms"], prediction["periodic"]
    stress = np.abs(prediction["stress"] - reference["stress"])[periodic]
    return {
        "energy_per_atom": float(np.max(np.abs(prediction["energy"] - reference["energy"]) / n_atoms)),
        "forces": float(np.max(np.abs(prediction["forces"] - reference["forces"]))),
        "stress": float(stress.max()) if stress.size else 0.0,
    }


@pytest.mark.parametrize("arch,frame_set,head", CASES, ids=[c[0] for c in CASES])
def test_parity_float64(references, arch, frame_set, head):
    config, variables = convert(references / f"{arch}.model", head=head)
    reference = np.load(references / f"{arch}.npz")
    # The reference must exercise the model: non-trivial forces, stress on periodic frames.
    assert np.abs(reference["forces"]).max() > 1e-2
    if frame_set == "materials":
        assert np.abs(reference["stress"]).max() > 1e-4
    err = errors(predict(config, variables, references / f"{frame_set}.extxyz"), reference)
    assert err["energy_per_atom"] <= E_TOL, err
    assert err["forces"] <= F_TOL, err
    assert err["stress"] <= S_TOL, err


def test_parity_float32(references):
    """`dtype="float32"` casts every leaf; the prediction stays float32 and close to torch's float64."""
    config, variables = convert(references / "mp0b3-medium.model", dtype="float32")
    assert config["dtype"] == "float32"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(variables))
    prediction = predict(config, variables, references / "materials.extxyz", dtype=jnp.float32)
    assert all(prediction[k].dtype == np.float32 for k in ("energy", "forces", "stress"))
    err = errors(prediction, np.load(references / "mp0b3-medium.npz"))
    assert err["energy_per_atom"] <= 1e-5, err
    assert err["forces"] <= 1e-4, err
    assert err["stress"] <= 1e-5, err


def test_rotation_equivariance(references, real_frames_dir):
    """Energy invariant, forces and stress rotate with the frame (hidden L=2, ZBL, Agnesi model)."""
    config, variables = convert(references / "mpa0-medium.model")
    frame = read_frames(real_frames_dir / FRAME_SETS["materials"][1][0])[3]
    rotation = np.linalg.qr(np.random.default_rng(7).normal(size=(3, 3)))[0]
    rotation *= np.sign(np.linalg.det(rotation))
    rotated = dataclasses.replace(frame, positions=frame.positions @ rotation.T, cell=frame.cell @ rotation.T)
    out = predict(config, variables, [frame, rotated])
    n = frame.num_atoms
    assert abs(out["energy"][1] - out["energy"][0]) <= 1e-10 * abs(out["energy"][0])
    np.testing.assert_allclose(out["forces"][n:], out["forces"][:n] @ rotation.T, atol=1e-9)
    np.testing.assert_allclose(out["stress"][1], rotation @ out["stress"][0] @ rotation.T, atol=1e-11)
    assert np.abs(out["forces"]).max() > 1e-2


def test_config_and_names(references):
    """Config is JSON; torch_names gives, for every leaf, the torch slice it was read from."""
    config, variables = convert(references / "mpa0-medium.model")
    json.dumps(config)
    assert config["model"] == "mace" and config["source"]["kind"] == "mace"
    flat = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    assert set(flat) == set(config["torch_names"])
    assert "constants/interactions_1/conv_tp/w3j_1_2_1" in flat
    state = module_state_dict(load_checkpoint(references / "mpa0-medium.model"))
    covered: dict[str, int] = {}
    for name, (key, start, stop, shape, torch_shape) in config["torch_names"].items():
        if start is None:  # a Python attribute (avg_num_neighbors, normalize2mom constant)
            assert name.startswith("constants/")
            continue
        assert list(state[key].shape) == torch_shape
        np.testing.assert_array_equal(flat[name], np.asarray(state[key]).reshape(-1)[start:stop].reshape(shape))
        if name.startswith("params/"):
            covered[key] = covered.get(key, 0) + stop - start
    # Every float parameter of the torch model is mapped once, entirely.
    weights = {k: v.size for k, v in state.items() if k.endswith(("weight", "weights_max")) or ".weights." in k}
    assert covered == {k: n for k, n in weights.items() if n}


def test_multihead_head_selection(references):
    with pytest.raises(CheckpointError, match="pt_head, DFT"):
        convert(references / "multihead.model")
    with pytest.raises(CheckpointError, match="no head 'PBE'"):
        convert(references / "multihead.model", head="PBE")
    config, _ = convert(references / "multihead.model", head="pt_head")
    assert config["head"] == "pt_head" and config["heads"] == ["pt_head", "DFT"]


@pytest.mark.parametrize(
    "arch,option,value",
    [
        ("unsupported-att", "interaction", "RealAgnosticAttResidualInteractionBlock"),
        ("unsupported-radial", "radial_type", "GaussianBasis"),
    ],
)
def test_unsupported_option(references, arch, option, value):
    """The error names the option and the class it found."""
    with pytest.raises(UnsupportedModelError, match=value) as info:
        convert(references / f"{arch}.model")
    assert option in str(info.value)


def test_cuequivariance_model(tmp_path):
    """A model saved with cuequivariance modules: convert it to e3nn first (read without unpickling)."""
    path = tmp_path / "cueq.model"
    with zipfile.ZipFile(path, "w") as archive:
        # A protocol-2 pickle naming a cuequivariance_torch class (GLOBAL opcode) and nothing else.
        global_op = b"ccuequivariance_torch.operations.symmetric_contraction\nSymmetricContraction\n"
        archive.writestr("cueq/data.pkl", b"\x80\x02" + global_op + b"q\x00.")
    with pytest.raises(CheckpointError, match="convert_cueq_e3nn"):
        convert(path)


def test_other_architecture_checkpoint(tmp_path):
    """A SevenNet checkpoint, a plain dict and a non-checkpoint are refused, saying what they are."""
    from weights_convert.sevenn import resolve_bundled

    sevennet = resolve_bundled("7net-0")
    if sevennet is not None:
        with pytest.raises(CheckpointError, match="SevenNet"):
            convert(sevennet)
    not_a_checkpoint = tmp_path / "frames.model"
    not_a_checkpoint.write_text("not a torch file")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        convert(not_a_checkpoint)


@pytest.mark.slow
def test_parity_full_size_mp0_medium(tmp_path, mace_python, real_frames_dir):
    """MACE-MP-0 medium at foundation size (128x0e+128x1o, 89 elements replaced by the frames' 7)."""
    _write_frames(real_frames_dir, "materials", tmp_path / "materials.extxyz")
    job = dict(arch="mp0-medium", seed=11, model=str(tmp_path / "mp0.model"), frames=str(tmp_path / "materials.extxyz"),
               out=str(tmp_path / "mp0.npz"), full_size=True)
    _run_reference(mace_python, [job], tmp_path, timeout=1800)
    config, variables = convert(tmp_path / "mp0.model")
    assert config["hidden_irreps"] == "128x0e+128x1o"
    err = errors(predict(config, variables, tmp_path / "materials.extxyz"), np.load(tmp_path / "mp0.npz"))
    assert err["energy_per_atom"] <= E_TOL and err["forces"] <= F_TOL and err["stress"] <= S_TOL, err


def test_symmetric_contraction_blocks_match_its_definition():
    """The block-sparse contraction equals sum_nu sum_k W_nu[s, k, c] sum_abc U_nu[m, a, b, .., k] x_a x_b ..
    for U columns that couple one multiset of l's (as mace's), several (merged into one block) or none."""
    import e3nn_jax as e3nn

    from sparse_eqv.models.mace import SymmetricContraction, coupling_blocks, u_couplings

    rng = np.random.default_rng(0)
    l_of_dim = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2])
    blocks = {0: slice(0, 1), 1: slice(1, 4), 2: slice(4, 9)}

    def column(*multisets):  # a (3, 9, 9) U_2 column of 1o, supported on the given (l_a, l_b) blocks
        u = np.zeros((3, 9, 9))
        for la, lb in multisets:
            u[:, blocks[la], blocks[lb]] = rng.normal(size=u[:, blocks[la], blocks[lb]].shape)
        return u

    u2 = np.stack([column((0, 1)), column((1, 2), (2, 1)), column((0, 1), (2, 2)), column(), column((1, 1))], -1)
    u1 = rng.normal(size=(3, 9, 1)) * (l_of_dim == 1)[None, :, None]
    couplings = tuple(
        tuple(tuple(tuple(ms) for ms in col) for col in u_couplings(u, l_of_dim, nu)) for nu, u in ((1, u1), (2, u2))
    )
    assert couplings[1][2] == ((0, 1), (2, 2)) and couplings[1][3] == () and couplings[1][1] == ((1, 2),)
    blocks_2 = {ms: tuple(columns) for ms, columns in coupling_blocks(couplings[1])}
    assert blocks_2 == {((0, 1), (2, 2)): (0, 2), ((1, 2),): (1,), ((1, 1),): (4,)}  # columns 0 and 2 share (0, 1)

    n, channels, n_elements = 11, 2, 3
    module = SymmetricContraction("2x0e+2x1o+2x2e", "2x1o", 2, n_elements, (couplings,), node_block=4)
    x = e3nn.IrrepsArray("2x0e+2x1o+2x2e", jnp.asarray(rng.normal(size=(n, 18))))
    species = jnp.asarray(rng.integers(0, n_elements, n))
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), x, species)
    variables = {"params": variables["params"],
                 "constants": {"U[1o,nu=1]": jnp.asarray(u1), "U[1o,nu=2]": jnp.asarray(u2)}}
    out = np.asarray(module.apply(variables, x, species).array).reshape(n, channels, 3)

    stacked = np.concatenate([np.asarray(c) for c in x.chunks], axis=-1)  # (n, C, 9)
    w1, w2 = (np.asarray(variables["params"][f"w[1o,nu={nu}]"])[np.asarray(species)] for nu in (1, 2))
    expected = np.einsum("mak,zkc,zca->zcm", u1, w1, stacked) + np.einsum("mabk,zkc,zca,zcb->zcm", u2, w2, stacked, stacked)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
