"""`sparse-eqv robustness`: drift and errors against the base model, dimer
curves, MD; bad frames refused naming file, frame and atoms."""

from __future__ import annotations

import json

import ase
import ase.io
import jax
import numpy as np
import pytest

from sparse_eqv.checkpoint import load_for_inference
from sparse_eqv.cli import main
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.readers import read_frames
from sparse_eqv.errors import DataError, SparseEqvError
from sparse_eqv.inference import Predictor
from sparse_eqv.robustness import HOLE_TOLERANCE_EV, curve_features, element_pairs, format_result
from sparse_eqv.testing import write_extxyz, write_tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_frames_dir):
    """A tiny SevenNet-architecture model fine-tuned (full, 1 epoch) on 4 SSE-PBE frames."""
    root = tmp_path_factory.mktemp("robustness")
    write_tiny_model(root / "model")
    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-init.system")
    write_extxyz(root / "train.xyz", frames[:4])
    write_extxyz(root / "valid.xyz", frames[4:6])
    write_extxyz(root / "other.xyz", read_frames(real_frames_dir / "sse-pbe" / "LiGePS-iter.000000-data.000")[:2])
    assert main(["finetune", str(root / "model"), "--train", str(root / "train.xyz"), "--valid",
                 str(root / "valid.xyz"), "--method", "full", "--epochs", "1", "--lr", "0.01", "--quiet",
                 "-o", str(root / "run")]) == 0
    return root


@pytest.fixture(scope="module")
def result(run):
    out = run / "robustness.json"
    assert main(["robustness", str(run / "run"), "--data", str(run / "other.xyz"), "--md-steps", "3",
                 "--md-frames", "1", "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def test_drift_and_errors_compare_the_two_models(run, result):
    (entry,) = result["data"]
    frames = read_frames(run / "other.xyz")
    base = Predictor(*load_for_inference(run / "model")).predict(frames)
    tuned = Predictor(*load_for_inference(run / "run")).predict(frames)
    forces = np.mean([np.abs(t["forces"] - b["forces"]).mean() for b, t in zip(base, tuned)])
    assert entry["drift"]["forces_mae"] == pytest.approx(1e3 * forces, rel=1e-6)
    assert entry["drift"]["forces_mae"] > 0.0  # one epoch at lr 0.01 moves a random model
    labels = np.concatenate([f.forces for f in frames])
    tuned_error = 1e3 * np.abs(np.concatenate([t["forces"] for t in tuned]) - labels).mean()
    assert entry["finetuned"]["raw"]["forces_mae"] == pytest.approx(tuned_error, rel=1e-6)
    assert entry["base"]["raw"]["forces_mae"] != pytest.approx(tuned_error, rel=1e-6)


def test_dimers_cover_every_training_pair_and_vanish_at_the_cutoff(result):
    assert result["elements"] == ["Li", "P", "S", "Ge"]
    assert [d["pair"] for d in result["dimers"]] == ["Li-Li", "Li-P", "Li-S", "Li-Ge", "P-P", "P-S", "P-Ge",
                                                     "S-S", "S-Ge", "Ge-Ge"]
    for dimer in result["dimers"]:
        assert dimer["r"][0] == pytest.approx(0.5) and dimer["r"][-1] == pytest.approx(3.5)
        for name in ("base", "finetuned"):
            assert abs(dimer[name]["energy"][-1]) < 1e-9  # at r_max the pair no longer interacts
        assert dimer["new_hole"] == (dimer["finetuned"]["hole"] and not dimer["base"]["hole"])
    assert len(result["figures"]) == 1


def test_md_rows(result):
    (pair,) = result["md"]
    for name in ("base", "finetuned"):
        assert pair[name]["steps_done"] == 3 and pair[name]["physical"]
        assert 0.5 < pair[name]["min_distance"] <= pair[name]["start_min_distance"] + 1e-9


def test_curve_features():
    r = np.linspace(0.5, 5.0, 226)
    morse = 2.0 * ((1 - np.exp(-1.5 * (r - 2.0))) ** 2 - 1)
    features = curve_features(r, morse)
    assert features["well_r"] == pytest.approx(2.0, abs=0.02) and not features["hole"]
    wall = r[r < 2.0][np.argmin(np.abs(morse[r < 2.0] - 1.0))]
    assert features["wall_r"] == pytest.approx(wall, abs=0.03)
    turned = np.where(r < 1.0, morse[np.argmin(np.abs(r - 1.0))] - 20.0 * (1.0 - r), morse)  # the wall turns over
    assert curve_features(r, turned)["hole"] and curve_features(r, turned)["hole_depth"] == pytest.approx(10.0, abs=0.1)
    collapse = -10.0 / r  # falls all the way in
    assert curve_features(r, collapse)["hole_depth"] == np.inf
    inner_well = np.where(r < 1.0, morse[np.argmin(np.abs(r - 1.0))] - 1000.0 * (1.0 - r) * (r - 0.6), morse)
    features = curve_features(r, inner_well)  # a deeper well at 0.8 Å behind the wall: the bond stays at 2 Å
    assert features["well_r"] == pytest.approx(2.0, abs=0.02) and features["r_min"] < 1.0 and features["hole"]
    ripple = morse - 0.5 * HOLE_TOLERANCE_EV * np.exp(-((r - 1.5) / 0.05) ** 2)  # below the tolerance
    assert not curve_features(r, ripple)["hole"]


def test_new_hole_is_reported():
    curve = {"energy": [], "r_min": 1.0, "e_min": -1.0, "well_r": 1.0, "well_e": -1.0, "wall_r": 0.7,
             "hole_depth": 0.0, "hole": False}
    holed = {**curve, "hole_depth": 0.4, "hole": True}
    text = format_result({"run": "r", "base": "b", "elements": ["Cu"], "data": [], "md": [],
                          "dimers": [{"pair": "Cu-Cu", "r": [], "base": curve, "finetuned": holed, "new_hole": True}]})
    assert "NEW HOLE" in text and "opened a short-range hole in: Cu-Cu" in text
    assert element_pairs([29, 8]) == [(8, 8), (8, 29), (29, 29)]


def test_frame_with_overlapping_atoms_is_refused(tmp_path):
    good = ase.Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.2]], cell=[3, 3, 3], pbc=True)
    image = ase.Atoms("Cu3", positions=[[0, 0, 0], [1.5, 1.5, 0], [2.99, 0, 0]], cell=[3, 3, 3], pbc=True)
    ase.io.write(tmp_path / "bad.extxyz", [good, image])  # atoms 0 and 2 are 0.01 Å apart through the cell
    with pytest.raises(DataError, match=r"bad.extxyz:1: atoms 2 and 0 are 0.01 Å apart|bad.extxyz:1: atoms 0 and 2"):
        read_frames(tmp_path / "bad.extxyz")


def test_non_finite_prediction_names_the_frame(run):
    config, variables = load_for_inference(run / "model")
    variables = jax.tree.map(lambda x: np.full_like(x, np.nan) if np.issubdtype(np.asarray(x).dtype, np.floating)
                             else x, variables)
    frame = Frame(numbers=np.array([3, 16]), positions=np.array([[0.0, 0, 0], [0, 0, 2.5]]), cell=np.zeros((3, 3)),
                  pbc=np.zeros(3, bool), source="pair.xyz:7")
    with pytest.raises(SparseEqvError, match="pair.xyz:7: the model predicts non-finite energy, forces"):
        Predictor(config, variables).predict([frame])
