"""A run directory written before the one-training-step refactor (tests/data/run-2026-12-07,
made by commit 134dca7 with `make_run.py`) is still evaluated, reported and exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from sparse_eqv.checkpoint import load_model
from sparse_eqv.cli import main

BUNDLE = Path(__file__).parents[1] / "data" / "run-2026-12-07"
WRITTEN_AT = "/tmp/oldrun/bundle"  # where make_run.py wrote it: run.json and the configs hold absolute paths


@pytest.fixture
def old_run(tmp_path) -> Path:
    """The bundle copied to tmp_path with its absolute paths moved there (as a user who moves a run does)."""
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE, root)
    for name in ("run/run.json", "base/config.json", "run/model/config.json"):
        path = root / name
        path.write_text(path.read_text().replace(WRITTEN_AT, str(root)))
    return root


def test_old_run_evaluates_reports_and_exports(old_run, tmp_path):
    run = old_run / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "evaluate.json"
    assert main(["evaluate", str(run), "--data", str(old_run / "valid.extxyz"), "--json", str(out), "--quiet"]) == 0
    np.testing.assert_allclose(json.loads(out.read_text())["raw"]["forces_mae"], metrics["valid"]["forces_mae"], rtol=1e-9)

    assert main(["report", str(run), "-o", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    sparsity = json.loads((run / "sparsity.json").read_text())["summary"]
    assert report["totals"]["n_delta_nonzero"] == sparsity["n_delta_nonzero"] > 0

    exported = tmp_path / "finetuned.pth"
    assert main(["export", str(run), "-o", str(exported)]) == 0
    assert main(["convert", str(exported), "-o", str(tmp_path / "reconverted")]) == 0
    ours = traverse_util.flatten_dict(load_model(run / "model")[1]["params"])
    back = traverse_util.flatten_dict(load_model(tmp_path / "reconverted")[1]["params"])
    base = traverse_util.flatten_dict(load_model(old_run / "base")[1]["params"])
    assert ours.keys() == back.keys() == base.keys()
    moved = 0
    for key in ours:
        np.testing.assert_allclose(back[key], ours[key], rtol=1e-6, atol=1e-7, err_msg=str(key))  # sevenn stores float32
        moved += int(np.sum(np.abs(back[key] - base[key]) > 1e-6))
    assert moved >= sparsity["n_delta_nonzero"]  # every kept delta went through export
