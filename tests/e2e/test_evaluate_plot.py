"""`sparse-eqv evaluate --plot DIR`: parity plots and error histograms of a tiny
model on tiny generated data, whose legends carry the metrics `evaluate` reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparse_eqv.cli import main
from sparse_eqv.data.readers import read_frames
from sparse_eqv.testing import write_extxyz, write_labelled_frames, write_tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model (random weights, PRNG 0) and five periodic frames labelled by another (PRNG 1)."""
    root = tmp_path_factory.mktemp("evaluate_plot")
    write_tiny_model(root / "model", seed=0)
    write_labelled_frames(root / "data.xyz", 5, seed=0, teacher_seed=1)
    return root


def _image(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    return matplotlib.image.imread(path)


def test_figures_and_legends_carry_the_evaluate_metrics(workdir, capsys):
    plots, metrics_file = workdir / "plots", workdir / "metrics.json"
    assert main(["evaluate", str(workdir / "model"), "--data", str(workdir / "data.xyz"), "--json", str(metrics_file),
                 "--plot", str(plots), "--quiet"]) == 0
    printed = capsys.readouterr().out
    metrics, summary = json.loads(metrics_file.read_text()), json.loads((plots / "parity.json").read_text())

    for name in ("parity_energy.png", "parity_forces.png", "parity_stress.png"):
        assert f"figure: {plots / name}" in printed
        image = _image(plots / name)
        assert image.shape[0] >= 400 and image.shape[1] >= 1000 and image.shape[2] in (3, 4)  # 11 x 4.8 in at 110 dpi
        assert np.ptp(image[..., :3]) > 0.5  # something is drawn
    assert sorted(summary["figures"]) == ["energy", "forces", "stress"]

    # The plotted errors are computed from the plotted points, independently of evaluate's metrics.
    expected = {("energy", "raw"), ("energy", "e0_fit"), ("forces", "raw"), ("stress", "raw")}
    assert {(q, s) for q in ("energy", "forces", "stress") for s in summary[q]} == expected
    units = {"energy": "meV/atom", "forces": "meV/Å", "stress": "meV/Å³"}
    for quantity, series in expected:
        plotted, reported = summary[quantity][series], metrics[series]
        assert plotted["unit"] == units[quantity]
        assert plotted["mae"] == pytest.approx(reported[f"{quantity}_mae"], rel=1e-12, abs=1e-12)
        assert plotted["rmse"] == pytest.approx(reported[f"{quantity}_rmse"], rel=1e-12, abs=1e-12)
        assert f"MAE {reported[f'{quantity}_mae']:.3f}, RMSE {reported[f'{quantity}_rmse']:.3f}" in plotted["legend"]
    assert metrics["raw"]["energy_mae"] != pytest.approx(metrics["e0_fit"]["energy_mae"])  # the two series differ
    assert summary["forces"]["raw"]["n"] == 5 * 8 * 3 and summary["stress"]["raw"]["n"] == 5 * 9


def test_only_the_labelled_quantities_are_drawn(workdir):
    frames = read_frames(workdir / "data.xyz")
    write_extxyz(workdir / "no_stress.xyz", frames)  # energy and forces only
    plots = workdir / "plots_no_stress"
    assert main(["evaluate", str(workdir / "model"), "--data", str(workdir / "no_stress.xyz"), "--plot", str(plots),
                 "--quiet"]) == 0
    assert sorted(p.name for p in plots.glob("*.png")) == ["parity_energy.png", "parity_forces.png"]
    assert sorted(json.loads((plots / "parity.json").read_text())["figures"]) == ["energy", "forces"]


def test_data_without_labels_is_refused_naming_the_file(workdir, capsys):
    import ase.io

    images = ase.io.read(workdir / "data.xyz", ":")
    for atoms in images:
        atoms.calc = None
    ase.io.write(workdir / "bare.xyz", images, format="extxyz")
    plots = workdir / "plots_bare"
    assert main(["evaluate", str(workdir / "model"), "--data", str(workdir / "bare.xyz"), "--plot", str(plots),
                 "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "bare.xyz" in error and "no energy, force or stress labels to plot" in error
    assert not plots.exists()
