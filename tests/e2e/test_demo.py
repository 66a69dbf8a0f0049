"""`sparse-eqv demo` end to end on a tiny SevenNet checkpoint (Cu/Ni, random
weights) instead of SevenNet-0: convert, EMT data, zero-shot, STR
fine-tuning, export, reload with sevenn's calculator, report, summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparse_eqv.cli import build_parser
from sparse_eqv.data.readers import read_frames
from sparse_eqv.demo.emt_data import emt_frames
from sparse_eqv.demo.run import run_demo, split_data, write_frames
from sparse_eqv.data.frames import Frame
from sparse_eqv.testing import tiny_cuni_checkpoint_config, write_sevenn_checkpoint



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo on the tiny checkpoint: 40 EMT frames, 8 epochs of 7 steps (the time limit is not reached)."""
    import io
    from contextlib import redirect_stdout

    root = tmp_path_factory.mktemp("demo")
    checkpoint = write_sevenn_checkpoint(root / "tiny.pth", tiny_cuni_checkpoint_config(), seed=5)
    printed = io.StringIO()
    with redirect_stdout(printed):
        summary = run_demo(root / "out", model=checkpoint, minutes=10.0, epochs=8, n_frames=40, lr=1e-2,
                           progress=False, compilation_cache=False)
    return root / "out", summary, printed.getvalue()


def test_demo_improves_on_zero_shot_and_reloads_in_sevenn(demo):
    out, summary, printed = demo
    zero, tuned = summary["zero_shot"], summary["finetuned"]
    assert tuned["e0_fit"]["energy_mae"] < zero["e0_fit"]["energy_mae"]
    assert tuned["raw"]["forces_mae"] < zero["raw"]["forces_mae"]
    assert summary["epochs"] == 8 and summary["steps"] == 8 * 7  # 28 training frames, 4 per step
    assert summary["compiles"] == {"train": 1, "eval": 1}  # one padding budget for every batch
    assert summary["dtype"] == "float32" and summary["reload_deviation"]["energy_eV_per_atom"] <= 1e-5
    assert summary["reload_deviation"]["forces_eV_per_A"] <= 1e-4
    assert 0.0 <= summary["sparsity"]["layer_sparsity"] <= 1.0
    for line in ("zero-shot  STR fine-tuned", "E MAE (meV/atom, E0 fitted)", "F MAE (meV/Å)", "layer sparsity",
                 "total sparsity", "reload check   : sevenn's SevenNetCalculator", "EMT (ase.calculators.emt), not DFT"):
        assert line in printed, line
    before_after = [row for row in printed.splitlines() if row.startswith("F MAE (meV/Å)")][0].split()[-2:]
    assert [float(x) for x in before_after] == pytest.approx(
        [zero["raw"]["forces_mae"], tuned["raw"]["forces_mae"]], abs=0.006)
    assert json.loads((out / "summary.json").read_text())["checkpoint"] == str(out / "finetuned.pth")


def test_demo_writes_everything_it_names(demo):
    out, summary, printed = demo
    for name in ("model/config.json", "data/emt_cuni_train.extxyz", "run/metrics.json", "run/log.csv",
                 "run/sparsity.json", "finetuned.pth", "finetuned.delta", "summary.json"):
        assert (out / name).exists(), name
        assert str(out / name.split("/")[0]) in printed or name.startswith(("run/", "model/")), name
    assert summary["figures"] and all(Path(f).suffix == ".png" and Path(f).stat().st_size > 0 for f in summary["figures"])
    frames = read_frames(out / "data" / "emt_cuni_test.extxyz")
    assert len(frames) == 6 and all(f.num_atoms in (7, 8) for f in frames)


def test_own_data_is_split_and_labels_survive(tmp_path):
    images = emt_frames(n_frames=20, seed=2)
    source = tmp_path / "mine.extxyz"
    import ase.io

    ase.io.write(source, images, format="extxyz")
    splits = split_data(source, tmp_path / "data", seed=0)
    parts = {name: read_frames(path) for name, path in splits.items()}
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [14, 3, 3]
    energies = sorted(f.energy for p in parts.values() for f in p)
    np.testing.assert_allclose(energies, sorted(a.info["energy"] for a in images), atol=1e-7)  # extxyz digits
    frame = parts["test"][0]
    match = min(images, key=lambda a: abs(a.info["energy"] - frame.energy))
    np.testing.assert_allclose(frame.forces, match.arrays["forces"], atol=1e-7)
    np.testing.assert_allclose(frame.stress, match.info["stress"], atol=1e-9)


def test_write_frames_keeps_unlabelled_frames_unlabelled(tmp_path):
    frame = Frame(np.array([29, 28]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.5]]), np.zeros((3, 3)), np.zeros(3, bool))
    back = read_frames(write_frames(tmp_path / "x.extxyz", [frame]))[0]
    assert back.energy is None and back.forces is None and back.stress is None


def test_cli_demo_options():
    args = build_parser().parse_args(["demo", "--data", "mine.extxyz", "--model", "ckpt.pth", "--minutes", "2.5"])
    assert (str(args.data), args.model, args.minutes) == ("mine.extxyz", "ckpt.pth", 2.5)


def test_readme_starts_with_the_two_commands_and_documents_every_option(repo_root):
    """The README's first commands are `make demo` and `make test`, and every
    subcommand and long option of the CLI appears in it."""
    import argparse

    readme = (repo_root / "README.md").read_text()
    first_block = readme.split("```")[1].splitlines()
    assert [line.split()[:2] for line in first_block[1:3]] == [["make", "demo"], ["make", "test"]]
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in subparsers.choices.items():
        if f"sparse-eqv {name}" not in readme:
            missing.append(name)
        missing += [f"{name} {option}" for action in parser._actions for option in action.option_strings
                    if option.startswith("--") and option != "--help" and option not in readme]
    assert not missing, f"not in README.md: {missing}"
