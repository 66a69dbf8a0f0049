"""scripts/bench.py in its CI-sized mode (tiny model, one frame, one repeat), so it cannot rot.

--tiny reads its aspirin frames from the fixtures in tests/data (no ../shared needed).

SevenNet: the JAX side only; the torch side (SevenNet-0 in sevenn) needs about
a minute on this machine even for one small frame and is left to the full run
(docs/performance.md). MACE: both sides (JAX and the mace-torch worker) on a
tiny mace-torch model built by the bench itself, float32 only (about a minute).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys


def _bench(repo_root):
    spec = importlib.util.spec_from_file_location("bench", repo_root / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_table_and_json(repo_root, tmp_path, capsys):
    bench = _bench(repo_root)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--no-torch", "--models", "sevenn", "--dtypes", "float32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["model"] == "sevenn" and result["backend"] == "jax" and result["dtype"] == "float32"
    assert result["predict_s"]["aspirin (21 at.)"] > 0 and result["train_step_s"] > 0
    assert result["compile_s"]["train step"] > 0 and result["peak_rss_mib"] > 0
    # 5 frames of 21 and 13 atoms, batches of 2: two padding budgets, two compilations
    assert result["compiles_per_epoch"]["compilations"] == 2
    printed = capsys.readouterr().out
    assert "train step" in printed and "peak RSS" in printed


def test_tiny_mace_both_sides(repo_root, mace_python, tmp_path, capsys):
    bench = _bench(repo_root)
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--models", "mace", "--dtypes", "float32", "--mace-python", str(mace_python), "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    by_backend = {r["backend"]: r for r in report["results"]}
    assert sorted(by_backend) == ["jax", "torch"]
    jax_row, torch_row = by_backend["jax"], by_backend["torch"]
    assert "mace-torch" in torch_row["version"]
    for row in (jax_row, torch_row):
        assert row["model"] == "mace" and row["dtype"] == "float32"
        assert row["predict_s"]["aspirin (21 at.)"] > 0 and row["train_step_s"] > 0 and row["peak_rss_mib"] > 0
    assert jax_row["compile_s"]["train step"] > 0
    assert jax_row["compiles_per_epoch"]["compilations"] == 2
    # both sides evaluated the same .model file: float32 energies of 21 atoms agree
    assert report["energy_diff_ev"]["mace"]["float32"] < 1e-3
    printed = capsys.readouterr().out
    assert "MACE (tiny" in printed and "max |E_jax - E_torch|" in printed


def test_table_ratios(repo_root):
    bench = _bench(repo_root)
    jax_row = {"backend": "jax", "dtype": "float64", "predict_s": {"aspirin (21 at.)": 1.0}, "train_step_s": 2.0,
               "compile_s": {"train step": 3.0}, "compiles_per_epoch": {"compilations": 2}, "peak_rss_mib": 10.0}
    torch_row = {"backend": "torch", "dtype": "float64", "predict_s": {"aspirin (21 at.)": 4.0}, "train_step_s": 8.0,
                 "compiles_per_epoch": {"compilations": 0}, "peak_rss_mib": 20.0}
    lines = {line.split("  ")[0]: line.split() for line in bench.table([jax_row, torch_row]).splitlines()}
    assert lines["predict aspirin (21 at.) [s]"][-1] == "0.25"
    assert lines["train step, batch [s]"][-1] == "0.25"
    assert lines["peak RSS [MiB]"][-1] == "0.50"


def test_table_keeps_rows_of_a_failed_worker(repo_root):
    bench = _bench(repo_root)
    jax_row = {"backend": "jax", "dtype": "float64", "predict_s": {"aspirin (21 at.)": 1.0}, "train_step_s": 2.0,
               "energy_ev": {"aspirin (21 at.)": -10.0}, "compiles_per_epoch": {"compilations": 2}}
    # killed (e.g. out of memory) after reporting its predict rows
    torch_row = {"backend": "torch", "dtype": "float64", "predict_s": {"aspirin (21 at.)": 4.0},
                 "energy_ev": {"aspirin (21 at.)": -10.5}, "error": "killed by signal 9"}
    lines = {line.split("  ")[0]: line.split() for line in bench.table([jax_row, torch_row]).splitlines()}
    assert lines["predict aspirin (21 at.) [s]"][-1] == "0.25"
    assert lines["train step, batch [s]"][-3:] == ["2.000", "-", "-"]
    assert bench.energy_differences([jax_row, torch_row]) == {"float64": 0.5}


def test_profile_ops_tiny_train_step(repo_root, tmp_path):
    """scripts/profile_ops.py joins the trace with the HLO: op kinds with time, dots among them.

    A subprocess: XLA reads the HLO-dump flag only when JAX starts its backend.
    """
    out = tmp_path / "ops.json"
    run = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "profile_ops.py"), "sevenn", "--tiny", "--json", str(out)],
        capture_output=True, text=True, check=True, cwd=repo_root,
    )
    report = json.loads(out.read_text())
    assert report["by_kind_ms"]["dot"][0] > 0 and report["by_kind_ms"]["dot"][1] > 0
    assert sum(ms for ms, _ in report["by_shape_ms"].values()) > 0
    assert "by op kind and output shape" in run.stdout


def test_probe_calls_tiny(repo_root):
    """scripts/probe_calls.py prints a prediction and each training step with
    CPU time, faults and RSS (a subprocess: its getrusage is the process's own)."""
    run = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "probe_calls.py"), "sevenn", "--tiny", "--frames", "aspirin",
         "--calls", "2", "--train-steps", "2"],
        capture_output=True, text=True, check=True, cwd=repo_root,
    )
    lines = run.stdout.splitlines()
    (predict,) = [line.split() for line in lines if line.startswith("predict aspirin")]
    steps = [line.split() for line in lines if line.startswith("train step")]
    assert [step[2] for step in steps] == ["0", "1"]
    values = [dict(zip(fields[:-1], fields[1:])) for fields in [predict] + steps]
    for row in values:
        assert float(row["wall"]) >= 0 and float(row["sys"]) >= 0 and float(row["rss"]) > 0
    first_step, second_step = values[1:]
    # the first step compiles and maps its buffers: slower and faulting
    assert float(first_step["wall"]) > float(second_step["wall"]) and int(first_step["faults"]) > 0
