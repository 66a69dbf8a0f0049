"""`finetune --replay`: pseudolabels from the base model, cached; the replay
loss changes training, holds the replay frames' predictions closer to the
base, resumes exactly; bad replay files are refused before the run starts."""

from __future__ import annotations

import json

import ase
import ase.io
import jax
import numpy as np
import pytest

from sparse_eqv.checkpoint import load_for_inference, load_model, pytree_checkpointer
from sparse_eqv.cli import main
from sparse_eqv.data.readers import read_frames
from sparse_eqv.finetune.e0s import composition
from sparse_eqv.finetune.loop import TrainConfig
from sparse_eqv.finetune.run import MethodOptions, finetune
from sparse_eqv.inference import Predictor
from sparse_eqv.testing import write_extxyz, write_tiny_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, real_frames_dir):
    """A tiny model, 4 training and 2 validation frames of LiGePS-init, and 3
    replay structures (no labels) of another SSE-PBE system."""
    root = tmp_path_factory.mktemp("replay")
    write_tiny_model(root / "model")
    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-init.system")
    write_extxyz(root / "train.xyz", frames[:4])
    write_extxyz(root / "valid.xyz", frames[4:6])
    other = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-iter.000000-data.000")[:3]
    ase.io.write(root / "replay.xyz", [f.to_atoms() for f in other])  # structures only
    return root


def run(workdir, name, epochs=2, resume=False, **replay):
    config = TrainConfig(epochs=epochs, batch_size=2, lr=0.01, seed=1, schedule="constant",
                         replay_weight=replay.pop("replay_weight", 1.0))
    return finetune(workdir / "model", workdir / name, train=workdir / "train.xyz", valid=workdir / "valid.xyz",
                    method=MethodOptions(method="full"), config=config, resume=resume, progress=False, **replay)


def last_state(run_dir):
    """The arrays of the run's last checkpoint (trainable tree, optimiser state)."""
    return jax.tree.leaves(pytree_checkpointer().restore((run_dir / "checkpoints" / "last" / "arrays").absolute()))


@pytest.fixture(scope="module")
def runs(workdir):
    run(workdir, "plain")
    run(workdir, "replay", replay=workdir / "replay.xyz", replay_weight=30.0)
    return workdir


def test_pseudolabels_are_the_base_model_with_the_run_e0s(runs):
    frames = read_frames(runs / "replay.xyz")
    base = Predictor(*load_for_inference(runs / "model")).predict(frames)
    cached = np.load(runs / "replay" / "replay_labels.npz")
    np.testing.assert_allclose(cached["forces"], np.concatenate([p["forces"] for p in base]), rtol=1e-10, atol=1e-12)
    info = json.loads((runs / "replay" / "run.json").read_text())
    config, _ = load_model(runs / "model")
    shift = np.array([info["e0_shift_eV"][str(z)] for z in config["atomic_numbers"]])
    expected = np.array([p["energy"] for p in base]) + composition(frames, config["atomic_numbers"]) @ shift
    np.testing.assert_allclose(cached["energy"], expected, rtol=1e-10)
    assert info["replay"] == {"file": str(runs / "replay.xyz"), "labels": "base", "weight": 30.0, "n_frames": 3}


def test_replay_keeps_the_replay_frames_closer_to_the_base(runs):
    frames = read_frames(runs / "replay.xyz")
    base = Predictor(*load_for_inference(runs / "model")).predict(frames)

    def drift(name):
        tuned = Predictor(*load_for_inference(runs / name)).predict(frames)
        return np.mean([np.abs(t["forces"] - b["forces"]).mean() for b, t in zip(base, tuned)])

    assert drift("replay") < 0.7 * drift("plain")


def test_resume_with_replay_is_exact(runs):
    run(runs, "resumed", epochs=1, replay=runs / "replay.xyz", replay_weight=30.0)
    run(runs, "resumed", epochs=2, resume=True, replay=runs / "replay.xyz", replay_weight=30.0)
    for a, b in zip(last_state(runs / "replay"), last_state(runs / "resumed"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_replay_with_an_unknown_element_is_refused_before_the_run(workdir, tmp_path, capsys):
    ase.io.write(tmp_path / "cu.xyz", [ase.Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.3]])])
    out = tmp_path / "run"
    code = main(["finetune", str(workdir / "model"), "--train", str(workdir / "train.xyz"), "--valid",
                 str(workdir / "valid.xyz"), "--method", "str", "--epochs", "1", "--replay", str(tmp_path / "cu.xyz"),
                 "--quiet", "-o", str(out)])
    assert code == 2
    assert "cu.xyz:0: element Cu (Z=29) is not in the model" in capsys.readouterr().err
    assert not out.exists()


def test_file_labels_need_labels(workdir, tmp_path, capsys):
    code = main(["finetune", str(workdir / "model"), "--train", str(workdir / "train.xyz"), "--valid",
                 str(workdir / "valid.xyz"), "--method", "full", "--epochs", "1", "--replay",
                 str(workdir / "replay.xyz"), "--replay-labels", "file", "--quiet", "-o", str(tmp_path / "run")])
    assert code == 2
    assert "replay.xyz: --replay-labels file, but" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_replay_batches_of_mixed_sizes_compile_the_step_once(workdir, tmp_path):
    whole = read_frames(workdir / "replay.xyz")[0].to_atoms()
    ase.io.write(tmp_path / "mixed.xyz", [whole, whole[:20], whole[:35]])  # 50-, 20- and 35-atom structures
    config = TrainConfig(epochs=1, batch_size=2, lr=0.01, seed=1, schedule="constant")
    result = finetune(workdir / "model", tmp_path / "run", train=workdir / "train.xyz", valid=workdir / "valid.xyz",
                      method=MethodOptions(method="full"), config=config, progress=False, replay=tmp_path / "mixed.xyz")
    assert result["compiles"]["train"] == 1  # every replay mix is padded to one budget
