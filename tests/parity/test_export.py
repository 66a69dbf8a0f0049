"""Export back to torch: merged checkpoints the official package loads, sparse
delta patches, apply-delta, and their errors (SevenNet-0, real weights)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sparse_eqv.checkpoint import load_model, save_model
from sparse_eqv.data.readers import read_frames
from sparse_eqv.errors import CheckpointError
from sparse_eqv.inference import Predictor
from sparse_eqv.testing import perturb_mapped_weights, write_stand_in_run
from weights_convert.convert import convert
from weights_convert.delta_patch import HEADER, PatchError, apply_to_state_dict, read_patch
from weights_convert.export import apply_delta, export_run

from torch_ref.sevenn_reference import predict as sevenn_predict


@pytest.fixture(scope="module")
def sevennet(tmp_path_factory):
    """SevenNet-0 converted once: (model dir, config, variables)."""
    directory = tmp_path_factory.mktemp("export") / "7net0"
    config, variables = convert("7net-0")
    save_model(directory, config, variables)
    config, variables = load_model(directory)
    return directory, config, variables


def perturbed(config: dict, variables, seed: int = 0):
    """Every leaf that maps to a torch tensor changed at up to 3 positions, by
    amounts representable in the checkpoint's float32 storage."""
    new, changed = perturb_mapped_weights(config, variables, seed=seed, n_entries=lambda size: min(3, size), scale=0.02)
    assert changed > 100
    return new


def test_unchanged_export_is_bit_identical(tmp_path, sevennet):
    model_dir, config, variables = sevennet
    run = write_stand_in_run(tmp_path / "run", model_dir, config, variables)
    export_run(run, tmp_path / "same.pth")
    assert (tmp_path / "same.pth").read_bytes() == Path(config["source"]["path"]).read_bytes()
    export_run(run, tmp_path / "empty.delta", delta_only=True)
    header, deltas = read_patch(tmp_path / "empty.delta")
    assert deltas == [] and header["kind"] == "sevenn"


def test_exported_checkpoint_loads_in_sevenn_and_matches(tmp_path, sevennet, real_frames_dir):
    model_dir, config, variables = sevennet
    new = perturbed(config, variables)
    run = write_stand_in_run(tmp_path / "run", model_dir, config, new)
    merged, patch = tmp_path / "merged.pth", tmp_path / "run.delta"
    summary = export_run(run, merged)
    export_run(run, patch, delta_only=True)

    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-iter.000000-data.000")[:2]
    ours = Predictor(config, new).predict(frames)
    theirs = sevenn_predict(str(merged), [f.to_atoms() for f in frames])
    base = Predictor(config, variables).predict(frames[:1])
    assert abs(base[0]["energy"] - ours[0]["energy"]) > 1e-3  # the perturbation matters
    for frame, a, b in zip(frames, ours, theirs):
        assert abs(a["energy"] - b["energy"]) / frame.num_atoms <= 1e-8
        assert np.abs(a["forces"] - b["forces"]).max() <= 1e-7
        assert np.abs(a["stress"] - b["stress"]).max() <= 1e-8

    # the patch holds only the changed numbers and rebuilds the same file
    header, deltas = read_patch(patch)
    nnz = sum(d.indices.size for d in deltas)
    assert nnz == summary["nnz"]
    payload = sum(i.compress_size for i in zipfile.ZipFile(patch).infolist() if i.filename != HEADER)
    assert payload <= 12 * nnz + 256 * len(deltas)
    apply_delta(config["source"]["path"], patch, tmp_path / "rebuilt.pth")
    assert (tmp_path / "rebuilt.pth").read_bytes() == merged.read_bytes()

    # and a torch user can apply it in memory, without JAX
    import torch

    state = torch.load(config["source"]["path"], map_location="cpu", weights_only=False)["model_state_dict"]
    apply_to_state_dict(state, patch)
    expected = torch.load(merged, map_location="cpu", weights_only=False)["model_state_dict"]
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_patch_errors_write_nothing(tmp_path, sevennet):
    model_dir, config, variables = sevennet
    run = write_stand_in_run(tmp_path / "run", model_dir, config, perturbed(config, variables, seed=1))
    patch = tmp_path / "good.delta"
    export_run(run, patch, delta_only=True)
    out = tmp_path / "out.pth"

    other = Path(config["source"]["path"]).parent.parent / "SevenNet_0__22May2024" / "checkpoint_sevennet_0.pth"
    with pytest.raises(PatchError, match="refusing to apply"):
        apply_delta(other, patch, out)

    corrupt = tmp_path / "corrupt.delta"
    corrupt.write_bytes(patch.read_bytes()[: patch.stat().st_size // 2])
    with pytest.raises(PatchError, match="not a readable"):
        apply_delta(config["source"]["path"], corrupt, out)

    unknown = tmp_path / "unknown.delta"
    with zipfile.ZipFile(patch) as src, zipfile.ZipFile(unknown, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == HEADER:
                data = json.dumps({**json.loads(data), "format": "something-else/9"}).encode()
            dst.writestr(info, data)
    with pytest.raises(PatchError, match="unknown patch format"):
        apply_delta(config["source"]["path"], unknown, out)
    assert not out.exists()


def test_missing_base_checkpoint_says_where_it_looked(tmp_path, sevennet):
    model_dir, config, variables = sevennet
    moved = dict(config, source=dict(config["source"], path=str(tmp_path / "gone" / "checkpoint.pth")))
    base_dir = tmp_path / "base"
    save_model(base_dir, moved, variables)
    run = write_stand_in_run(tmp_path / "run", base_dir, moved, variables)
    with pytest.raises(CheckpointError, match=r"looked for '.*gone/checkpoint.pth'"):
        export_run(run, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_mace_export_loads_in_mace_calculator(tmp_path, mace_python, repo_root, real_frames_dir):
    """A random-weight MACE-MP-0b3-architecture model (reduced channels), every
    weight leaf and the E0s changed, exported, and evaluated by mace-torch's
    MACECalculator (float64) against the JAX model with the same changes."""
    import ase.io
    import subprocess

    env = {**__import__("os").environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    base_file = tmp_path / "base.model"
    subprocess.run(
        [str(mace_python), str(repo_root / "tests/torch_ref/mace_reference.py"), "mp0b3-medium", "--seed", "3",
         "--model", str(base_file)], check=True, env=env, capture_output=True,
    )
    config, variables = convert(base_file)
    base_dir = tmp_path / "base"
    save_model(base_dir, config, variables)
    config, variables = load_model(base_dir)
    export_run(write_stand_in_run(tmp_path / "run", base_dir, config, variables), tmp_path / "same.model")
    assert (tmp_path / "same.model").read_bytes() == base_file.read_bytes()  # round trip, bit for bit
    new = perturbed(config, variables, seed=2)
    new["constants"]["atomic_energies"][:2] += [0.25, -0.5]  # as an E0 fit does
    run = write_stand_in_run(tmp_path / "run", base_dir, config, new)
    merged = tmp_path / "merged.model"
    export_run(run, merged)
    assert merged.stat().st_size == base_file.stat().st_size

    frames_file = tmp_path / "frames.extxyz"
    source = read_frames(real_frames_dir / "cu" / "mlearn_Cu_test.json")[:2]
    ase.io.write(frames_file, [f.to_atoms() for f in source], format="extxyz")
    frames = read_frames(frames_file)  # both sides see the same (rounded) positions
    out = tmp_path / "torch.npz"
    subprocess.run(
        [str(mace_python), str(repo_root / "tests/torch_ref/export_mace_calculator.py"), str(merged), str(frames_file),
         str(out)], check=True, env=env, capture_output=True,
    )
    theirs = np.load(out)
    ours = Predictor(config, new).predict(frames)
    before = Predictor(config, variables).predict(frames[:1])
    assert abs(before[0]["energy"] - ours[0]["energy"]) > 1e-3
    offset = 0
    for index, (frame, prediction) in enumerate(zip(frames, ours)):
        n = frame.num_atoms
        assert abs(prediction["energy"] - theirs["energy"][index]) / n <= 1e-8
        assert np.abs(prediction["forces"] - theirs["forces"][offset : offset + n]).max() <= 1e-7
        assert np.abs(prediction["stress"] - theirs["stress"][index]).max() <= 1e-8
        offset += n

    patch = tmp_path / "run.delta"
    export_run(run, patch, delta_only=True)
    apply_delta(base_file, patch, tmp_path / "rebuilt.model")
    assert (tmp_path / "rebuilt.model").read_bytes() == merged.read_bytes()


def test_nequip_export_loads_in_nequip(tmp_path, real_frames_dir):
    """A random-weight nequip checkpoint with EMA weights: every weight leaf
    changed, exported to a .ckpt, evaluated by nequip's own calculator."""
    from torch_ref import nequip_reference
    from torch_ref.nequip_parity_utils import real_frames, small_config

    base_file = nequip_reference.write_checkpoint(tmp_path / "base.ckpt", small_config(), ema=True)
    config, variables = convert(base_file)
    base_dir = tmp_path / "base"
    save_model(base_dir, config, variables)
    config, variables = load_model(base_dir)
    new = perturbed(config, variables, seed=4)
    run = write_stand_in_run(tmp_path / "run", base_dir, config, new)
    merged = tmp_path / "merged.ckpt"
    export_run(run, merged)

    frames = real_frames(real_frames_dir)
    ours = Predictor(config, new).predict(frames)
    theirs = nequip_reference.predict(str(merged), [f.to_atoms() for f in frames])
    before = Predictor(config, variables).predict(frames[:1])
    assert abs(before[0]["energy"] - ours[0]["energy"]) > 1e-4
    for frame, a, b in zip(frames, ours, theirs):
        assert abs(a["energy"] - b["energy"]) / frame.num_atoms <= 1e-8
        assert np.abs(a["forces"] - b["forces"]).max() <= 1e-7

    patch = tmp_path / "run.delta"
    export_run(run, patch, delta_only=True)
    apply_delta(base_file, patch, tmp_path / "rebuilt.ckpt")
    assert (tmp_path / "rebuilt.ckpt").read_bytes() == merged.read_bytes()


def test_str_run_exports_through_the_cli(tmp_path, real_frames_dir):
    """convert -> finetune --method str (a few steps) -> export / export --delta-only
    -> apply-delta, all through the CLI; nequip evaluates the exported file."""
    from sparse_eqv.cli import main
    from torch_ref import nequip_reference
    from torch_ref.nequip_parity_utils import small_config

    base_file = nequip_reference.write_checkpoint(tmp_path / "base.ckpt", small_config(), ema=True)
    import ase.io

    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-iter.000000-data.000")[:6]
    images = []
    for frame in frames:
        atoms = frame.to_atoms()
        atoms.info.update(energy=frame.energy, stress=frame.stress)
        atoms.arrays["forces"] = frame.forces
        images.append(atoms)
    train, valid = tmp_path / "train.extxyz", tmp_path / "valid.extxyz"
    ase.io.write(train, images[:4], format="extxyz")
    ase.io.write(valid, images[4:], format="extxyz")
    frames = read_frames(valid)
    model, run = tmp_path / "model", tmp_path / "run"
    assert main(["convert", str(base_file), "-o", str(model)]) == 0
    assert main(["finetune", str(model), "--train", str(train), "--valid", str(valid), "--method", "str",
                 "--epochs", "1", "--batch-size", "2", "--lr", "0.01", "--quiet", "-o", str(run)]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "ft.ckpt")]) == 0
    assert main(["export", str(run), "--delta-only", "-o", str(tmp_path / "ft.delta")]) == 0
    assert main(["apply-delta", str(base_file), str(tmp_path / "ft.delta"), "-o", str(tmp_path / "re.ckpt")]) == 0
    assert (tmp_path / "re.ckpt").read_bytes() == (tmp_path / "ft.ckpt").read_bytes()
    header, deltas = read_patch(tmp_path / "ft.delta")
    assert header["method"] == "str" and sum(d.indices.size for d in deltas) > 0

    config, variables = load_model(run / "model")
    ours = Predictor(config, variables).predict(frames)
    theirs = nequip_reference.predict(str(tmp_path / "ft.ckpt"), [f.to_atoms() for f in frames])
    for frame, a, b in zip(frames, ours, theirs):
        assert abs(a["energy"] - b["energy"]) / frame.num_atoms <= 1e-8
        assert np.abs(a["forces"] - b["forces"]).max() <= 1e-7
