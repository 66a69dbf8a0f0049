"""Errors people hit in their first hour, each as the user meets it.

Already covered elsewhere (not repeated here): a wrong energy key at the
reader (test_data), a cuequivariance-saved MACE model (test_mace_parity),
unknown elements, NaN labels and empty files through `finetune`
(test_finetune). Here: frames whose atoms have no neighbours (they work, as
in sevenn: checked against it; a training step over them stays finite), a
wrong `--energy-key` through `finetune`, an existing run directory (refused;
`--overwrite` replaces it), and XLA running out of memory (one line naming
the option to lower).
"""

from __future__ import annotations

from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT

import sparse_eqv.finetune.loop
import sparse_eqv.inference
from sparse_eqv.checkpoint import load_model, save_model
from sparse_eqv.cli import main
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.readers import read_frames
from sparse_eqv.demo.emt_data import emt_frames
from sparse_eqv.finetune.loop import Trainer, TrainConfig, make_graphs
from sparse_eqv.finetune.run import MethodOptions, make_method
from sparse_eqv.inference import Predictor
from sparse_eqv.models import build_model
from sparse_eqv.testing import tiny_cuni_checkpoint_config, write_sevenn_checkpoint
from weights_convert.convert import convert

from torch_ref.sevenn_reference import predict as sevenn_predict

TINY_CUNI = tiny_cuni_checkpoint_config()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(sevenn checkpoint, converted float64 model dir, extxyz train/valid files with an isolated atom)."""
    root = tmp_path_factory.mktemp("errors")
    checkpoint = write_sevenn_checkpoint(root / "tiny.pth", TINY_CUNI, seed=3)
    config, variables = convert(str(checkpoint))
    save_model(root / "model", config, variables)
    frames = emt_frames(n_frames=8, seed=1)
    isolated = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=[9.0, 9.0, 9.0], pbc=True)
    isolated.calc = EMT()
    isolated.info.update(energy=isolated.get_potential_energy(), stress=isolated.get_stress(voigt=False))
    isolated.arrays["forces"] = isolated.get_forces()
    isolated.calc = None
    ase.io.write(root / "train.extxyz", frames[:5] + [isolated], format="extxyz")
    ase.io.write(root / "valid.extxyz", frames[5:], format="extxyz")
    return checkpoint, root / "model", root


def test_frames_without_neighbours_work_as_in_sevenn(tiny):
    """An isolated atom has the model's no-neighbour energy and zero forces (sevenn
    gives the same; MACE's would be its E0); atoms out of range add up."""
    checkpoint, model_dir, _ = tiny
    atoms = [
        Atoms("Cu", positions=[[0.0, 0.0, 0.0]]),
        Atoms("Ni", positions=[[1.0, 2.0, 3.0]]),
        Atoms("CuNi", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, 8.0]]),
        Atoms("Cu", positions=[[1.0, 1.0, 1.0]], cell=[9.0, 9.0, 9.0], pbc=True),
        Atoms("CuNi", positions=[[0.0, 0.0, 0.0], [0.3, 0.4, 2.4]]),  # a bonded pair, for contrast
    ]
    frames = [Frame(a.numbers, a.positions, a.cell.array, a.pbc, source=f"frame {i}") for i, a in enumerate(atoms)]
    ours = Predictor(*load_model(model_dir)).predict(frames)
    theirs = sevenn_predict(str(checkpoint), atoms, dtype="float64")
    for frame, a, b in zip(frames, ours, theirs):
        assert abs(a["energy"] - b["energy"]) / frame.num_atoms <= 1e-8
        np.testing.assert_allclose(a["forces"], b["forces"], atol=1e-7)
    for result in ours[:4]:
        assert np.all(result["forces"] == 0.0) and np.isfinite(result["energy"])
    assert abs(ours[2]["energy"] - ours[0]["energy"] - ours[1]["energy"]) < 1e-10
    assert abs(ours[3]["energy"] - ours[0]["energy"]) < 1e-10
    assert np.abs(ours[4]["forces"]).max() > 1e-3


def finetune_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(root / "model"), "--train", str(root / "train.extxyz"), "--valid",
            str(root / "valid.extxyz"), "--epochs", "1", "--batch-size", "3", "--quiet", "-o", str(out), *extra]


def test_training_with_an_isolated_atom_is_finite(tiny):
    """One STR step on a batch whose frames include an atom without neighbours."""
    _, model_dir, root = tiny
    config, variables = load_model(model_dir)
    frames = read_frames(root / "train.extxyz")
    graphs = make_graphs(frames, config["atomic_numbers"], config["r_max"])
    assert graphs[-1].n_edge[0] == 0
    module = build_model(config)
    method = make_method(MethodOptions(method="str"), variables["params"], config)
    trainer = Trainer(module, variables["constants"], method, variables["params"], TrainConfig(batch_size=3, lr=1e-2),
                      cutoff=config["r_max"])
    state = trainer.initial_state()
    before = trainer.evaluate(variables["params"], [graphs[-1]], [frames[-1]])
    assert np.isfinite(before["energy_mae"]) and before["forces_mae"] < 1e-9
    loss = trainer.train_step(state, trainer.stack(graphs, [3, 4, 5])[0])
    assert np.all(np.isfinite(loss))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(trainer.run_state(state, 0).tree))


def test_existing_run_directory_is_refused_and_overwrite_replaces_it(tiny, tmp_path, capsys, monkeypatch):
    _, _, root = tiny
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(finetune_args(root, out)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{out}: already exists" in err and "--overwrite" in err, err
    assert (out / "notes.txt").read_text() == "mine"
    # --overwrite replaces the directory before training starts (which then stops at once: no compilation here)
    monkeypatch.setattr(sparse_eqv.finetune.loop, "energy_forces_stress", _out_of_memory)
    assert main(finetune_args(root, out, "--overwrite", "--e0s", "keep")) == 2
    assert "out of memory" in capsys.readouterr().err
    assert not (out / "notes.txt").exists() and (out / "run.json").exists()


def test_wrong_energy_key_lists_the_keys_present(tiny, tmp_path, capsys):
    _, _, root = tiny
    out = tmp_path / "run"
    assert main(finetune_args(root, out, "--energy-key", "REF_energy")) == 2
    err = capsys.readouterr().err
    assert "train.extxyz:0: no energy under key 'REF_energy'; scalar keys present: " in err, err
    assert "energy" in err.split("scalar keys present: ")[1] and "--energy-key" in err
    assert not out.exists()


def _out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.00GiB.")


def test_out_of_memory_in_predict_names_batch_atoms(tiny, tmp_path, capsys, monkeypatch):
    _, model_dir, root = tiny
    monkeypatch.setattr(sparse_eqv.inference, "prediction_function", lambda config_json: _out_of_memory)
    out = tmp_path / "predicted.extxyz"
    assert main(["predict", str(model_dir), "--data", str(root / "valid.extxyz"), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "out of memory" in err and "--batch-atoms" in err, err
    assert not out.exists()


@pytest.mark.parametrize("e0s, where", [("fit", "an evaluation batch"), ("keep", "a training step")])
def test_out_of_memory_in_finetune_names_batch_size(tiny, tmp_path, capsys, monkeypatch, e0s, where):
    _, _, root = tiny
    monkeypatch.setattr(sparse_eqv.finetune.loop, "energy_forces_stress", _out_of_memory)
    assert main(finetune_args(root, tmp_path / "run", "--e0s", e0s)) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"out of memory in {where} on 3 frames" in err, err
    assert "lower --batch-size (now 3)" in err


def test_other_runtime_errors_pass_through(tiny, monkeypatch):
    _, model_dir, root = tiny

    def internal(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(sparse_eqv.inference, "prediction_function", lambda config_json: internal)
    frames = [Frame(np.array([29]), np.zeros((1, 3)), np.zeros((3, 3)), np.zeros(3, bool))]
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        Predictor(*load_model(model_dir)).predict(frames)
