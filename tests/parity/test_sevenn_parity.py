"""SevenNet (sevenn 0.13) checkpoints converted to Flax predict what sevenn predicts.

Real pretrained weights (the checkpoints bundled with sevenn) on real DFT
frames: Cu fcc (108 atoms), Li10GeP2S12 (50 atoms) and aspirin (open
boundaries), all in one padded batch. The reference is sevenn's own model in
float64 (see `torch_ref/sevenn_reference.py`); float32 is compared with the
`SevenNetCalculator` as shipped.
"""

from __future__ import annotations

import functools
import os
import zipfile

import jax
import numpy as np
import pytest

pytest.importorskip("sevenn")
pytest.importorskip("torch")

from torch_ref import sevenn_reference  # noqa: E402
from torch_ref.nequip_parity_utils import assert_rotation_equivariant, deviations, jax_predict, real_frames  # noqa: E402

from sparse_eqv.errors import CheckpointError, UnsupportedModelError  # noqa: E402
from weights_convert import sevenn as sevenn_convert  # noqa: E402

TOL = {"energy_per_atom": 1e-8, "forces": 1e-7, "stress": 1e-8}
# float32 on both sides (sevenn's calculator as shipped, our float32 conversion):
# what two float32 implementations of a 5-layer network can agree to.
TOL32 = {"energy_per_atom": 2e-5, "forces": 2e-4, "stress": 2e-6}


@functools.lru_cache(maxsize=None)
def _converted(name: str):
    return sevenn_convert.convert(name)


@functools.lru_cache(maxsize=None)
def _reference(name: str, dtype: str = "float64"):
    return sevenn_reference.predict(str(sevenn_convert.resolve_bundled(name)), [f.to_atoms() for f in _FRAMES], dtype)


_FRAMES: list = []


@pytest.fixture(scope="module")
def frames(real_frames_dir):
    """Cu 108 atoms, Li10GeP2S12 50 atoms, aspirin 21 atoms: one batch (one compilation per architecture)."""
    if not _FRAMES:
        _FRAMES.extend(real_frames(real_frames_dir))
    return _FRAMES


def _report(label, dev):
    print(f"{label}: " + ", ".join(f"{k} {v:.2e}" for k, v in dev.items()))


@pytest.mark.parametrize(
    "name",
    [
        "7net-0",
        # the other full-size checkpoints: minutes each on 2 cores (`make test` runs them)
        pytest.param("7net-0_22May2024", marks=pytest.mark.slow),
        pytest.param("7net-l3i5", marks=pytest.mark.slow),
    ],
)
def test_float64_parity(frames, name):
    """SevenNet-0 (11Jul2024, 22May2024: XPLOR cutoff, l_max 2) and SevenNet-l3i5 (l_max 3, polynomial cutoff)."""
    config, variables = _converted(name)
    dev = deviations(frames, jax_predict(config, variables, frames), _reference(name))
    _report(f"{name} float64", dev)
    for k, tol in TOL.items():
        assert dev[k] <= tol, (name, k, dev)


def test_float32_tier(frames):
    config, variables = _converted("7net-0")
    variables32 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), variables)
    ours = jax_predict({**config, "dtype": "float32"}, variables32, frames, dtype=np.float32)
    dev = deviations(frames, ours, _reference("7net-0", "float32"))
    _report("7net-0 float32", dev)
    for k, tol in TOL32.items():
        assert dev[k] <= tol, (k, dev)


def test_rotation_equivariance(frames):
    config, variables = _converted("7net-0")
    assert_rotation_equivariant(config, variables, frames, TOL)


def test_config_and_mapping():
    config, variables = _converted("7net-0")
    assert config["model"] == "sevenn" and config["r_max"] == 5.0
    assert len(config["atomic_numbers"]) == 89 and 29 in config["atomic_numbers"]
    assert config["source"]["kind"] == "sevenn" and len(config["source"]["sha256"]) == 64
    # one leaf per e3nn instruction, each a slice of one torch tensor
    names = config["torch_names"]
    key, start, stop, shape = names["params/layer_1/linear_2/w[0,0]"]
    assert key == "1_self_interaction_2.linear.weight" and stop - start == np.prod(shape)
    leaf = variables["params"]["layer_1"]["linear_2"]["w[0,0]"]
    assert list(leaf.shape) == shape
    assert names["constants/layer_0/post_norm"][0] == "0_convolution.denominator"
    covered = sum(np.prod(v[3]) for k, v in names.items() if k.startswith("params/"))
    n_params = sum(np.size(x) for x in _leaves(variables["params"]))
    assert covered == n_params


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_resolve_bundled():
    for name in ("7net-0", "7net-0_22May2024", "7net-l3i5", "7net-mf-0"):
        path = sevenn_convert.resolve_bundled(name)
        assert path is not None and path.is_file() and path.suffix == ".pth"
    assert sevenn_convert.resolve_bundled("7net-omni") is None


def test_multi_fidelity_needs_a_modality():
    with pytest.raises(UnsupportedModelError, match="R2SCAN, PBE"):
        sevenn_convert.convert("7net-mf-0")
    with pytest.raises(UnsupportedModelError, match="no head"):
        sevenn_convert.convert("7net-0", head="PBE")


@pytest.mark.slow
def test_multi_fidelity_parity(frames):
    """SevenNet-MF-0 with the PBE modality fixed at conversion."""
    config, variables = sevenn_convert.convert("7net-mf-0", head="PBE")
    assert config["modality"] == {"name": "PBE", "index": 1, "count": 2, "readout": True}
    assert config["torch_names"]["constants/shift"][1] == len(config["atomic_numbers"])  # row of PBE
    reference = sevenn_reference.predict(
        str(sevenn_convert.resolve_bundled("7net-mf-0")), [f.to_atoms() for f in frames], modal="PBE"
    )
    dev = deviations(frames, jax_predict(config, variables, frames), reference)
    _report("7net-mf-0 (PBE) float64", dev)
    for k, tol in TOL.items():
        assert dev[k] <= tol, (k, dev)


def test_wrong_files_are_refused(tmp_path):
    import torch

    junk = tmp_path / "random.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="weights-only"):
        sevenn_convert.convert(junk)
    mace_like = tmp_path / "mace_like.pth"
    torch.save({"interactions.0.linear.weight": torch.zeros(4), "atomic_numbers": torch.tensor([1, 8])}, mace_like)
    with pytest.raises(CheckpointError, match="not a SevenNet checkpoint"):
        sevenn_convert.convert(mace_like)
    assert zipfile.is_zipfile(mace_like)


def test_missing_leaf_is_an_error():
    config, variables = _converted("7net-0")
    from sparse_eqv.models import build_model

    params = {**variables["params"], "layer_0": {k: v for k, v in variables["params"]["layer_0"].items() if k != "linear_1"}}
    with pytest.raises(CheckpointError, match="missing"):
        sevenn_convert.check_variables(build_model(config), {**variables, "params": params}, "test")
