"""`sparse-eqv curves`: the figure draws what each run's log.csv holds."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from sparse_eqv.cli import main
from sparse_eqv.curves import curves_figure, read_log
from sparse_eqv.errors import SparseEqvError


def _write_log(run_dir, rows):
    run_dir.mkdir(parents=True)
    with (run_dir / "log.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    str_run = _write_log(tmp_path / "str_h", [
        {"epoch": e, "step": 50 * e, "valid_forces_mae": 80.0 / e, "layer_sparsity": 0.2 * e} for e in range(1, 5)
    ])
    full_run = _write_log(tmp_path / "full", [
        {"epoch": e, "step": 50 * e, "valid_forces_mae": 70.0 / e} for e in range(1, 4)
    ])
    return str_run, full_run


def test_figure_lines_are_the_logged_values(runs):
    str_run, full_run = runs
    figure = curves_figure({"STR H": read_log(str_run), "full": read_log(full_run)})
    error_ax, sparsity_ax = figure.axes  # no run logged a training loss or energy MAE: two panels
    lines = {line.get_label(): line for line in error_ax.lines}
    np.testing.assert_allclose(lines["STR H"].get_xdata(), [50, 100, 150, 200])
    np.testing.assert_allclose(lines["STR H"].get_ydata(), [80.0, 40.0, 80.0 / 3, 20.0])
    np.testing.assert_allclose(lines["full"].get_ydata(), [70.0, 35.0, 70.0 / 3])
    assert error_ax.get_yscale() == "log"
    assert error_ax.get_ylabel() == "validation force MAE (meV/Å)"
    (sparsity_line,) = sparsity_ax.lines  # the full run has no sparsity column
    assert sparsity_line.get_label() == "STR H"
    np.testing.assert_allclose(sparsity_line.get_ydata(), [20.0, 40.0, 60.0, 80.0])


def test_cli_writes_png(runs, tmp_path, capsys):
    output = tmp_path / "figures" / "curves.png"
    assert main(["curves", *map(str, runs), "--labels", "STR H", "full", "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 run(s)" in capsys.readouterr().out


def test_missing_log_names_the_file(tmp_path):
    with pytest.raises(SparseEqvError, match="log.csv: no such file"):
        read_log(tmp_path)
    assert main(["curves", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
