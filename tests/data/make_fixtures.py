"""Regenerate the test fixtures in tests/data from the full reference data.

    python tests/data/make_fixtures.py [--source ../shared/data] [--check]

Each fixture is a few frames cut from one file of the reference data (see
tests/data/README.md for sources and licences), written in the original's
format so that the readers are tested on real files:

    rMD17 .npz         every array cut along the frame axis (nuclear_charges kept), np.savez
    DeePMD directory   type.raw and type_map.raw copied, every set.000/*.npy cut along the frame axis
    mlearn .json       the chosen records, unchanged, in a JSON list
    extxyz             the chosen frames' lines, byte for byte

The frames kept (indices into the original, in this order) are those the
tests use; a test's index into a fixture is its position in this list.
--check regenerates into a temporary directory and compares (byte for byte,
.npz files array by array).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[1].parent / "shared" / "data"

# fixture path (relative to tests/data and to the source) -> original frame indices kept, in order
FIXTURES: dict[str, list[int]] = {
    # aspirin: 0-4 bench --tiny (and 0-1 most tests), 7 the unknown-element message, 500 MACE parity
    "rmd17/rmd17_aspirin_test_01.npz": [0, 1, 2, 3, 4, 5, 6, 7, 500],
    "rmd17/rmd17_paracetamol_test_01.npz": [0, 500],  # MACE parity
    "rmd17/rmd17_ethanol_test_01.npz": [0, 1, 2, 3, 4],  # padding budget
    # 50-atom Li10GeP2S12 with virial: 0-5 readers/export, 3 rotation test, 150 MACE parity
    "sse-pbe/LiGePS-iter.000000-data.000": [0, 1, 2, 3, 4, 5, 150],
    # 50-atom Li10GeP2S12 without virial, fine-tuning: 0-17 training, 300-301 and 400-401 validation
    "sse-pbe/LiGePS-init.system": list(range(18)) + [300, 301, 400, 401],
    # Cu: 0-2 readers/potential/parity, 60 MACE parity
    "cu/mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz": [0, 1, 2, 60],
    # Cu: vacancies (107 atoms), surfaces (20, 30), AIMD (108)
    "cu/mlearn_Cu_test.json": [0, 1, 2, 3, 4, 5, 6, 7],
    # antiferromagnetic NiO with spin.npy: magnetic-moment head
    "nio-spin/data_0": [0, 20, 40, 59],
    "nio-spin/data_2": [0, 30],
}


def cut_npz(source: Path, target: Path, frames: list[int]) -> None:
    with np.load(source) as data:
        arrays = {k: data[k] if k == "nuclear_charges" else data[k][frames] for k in data.files}
    np.savez(target, **arrays)


def cut_deepmd(source: Path, target: Path, frames: list[int]) -> None:
    target.mkdir()
    for name in ("type.raw", "type_map.raw"):
        shutil.copyfile(source / name, target / name)
    for set_dir in sorted(p for p in source.glob("set.*") if p.is_dir()):
        if set_dir.name != "set.000":
            raise ValueError(f"{set_dir}: only one set.000 is supported here")
        (target / set_dir.name).mkdir()
        for array in sorted(set_dir.glob("*.npy")):
            np.save(target / set_dir.name / array.name, np.load(array)[frames])


def cut_mlearn(source: Path, target: Path, frames: list[int]) -> None:
    records = json.loads(source.read_text())
    target.write_text(json.dumps([records[i] for i in frames]))


def cut_extxyz(source: Path, target: Path, frames: list[int]) -> None:
    lines = source.read_text().splitlines(keepends=True)
    starts, i = [], 0
    while i < len(lines):
        starts.append(i)
        i += int(lines[i]) + 2
    blocks = [lines[s : s + int(lines[s]) + 2] for s in starts]
    target.write_text("".join(line for i in frames for line in blocks[i]))


def make(source: Path, out: Path) -> None:
    for name, frames in FIXTURES.items():
        src, dst = source / name, out / name
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            cut_deepmd(src, dst, frames)
        elif src.suffix == ".npz":
            cut_npz(src, dst, frames)
        elif src.suffix == ".json":
            cut_mlearn(src, dst, frames)
        else:
            cut_extxyz(src, dst, frames)


def same(a: Path, b: Path) -> list[str]:
    """Paths under the fixtures that differ between the two trees."""
    differ = []
    for name in FIXTURES:
        files = sorted(p.relative_to(a) for p in (a / name).rglob("*") if p.is_file()) if (a / name).is_dir() else [Path(name)]
        other = sorted(p.relative_to(b) for p in (b / name).rglob("*") if p.is_file()) if (b / name).is_dir() else [Path(name)]
        if files != other:
            differ.append(name)
            continue
        differ += [str(f) for f in files if not (b / f).exists() or not _equal(a / f, b / f)]
    return differ


def _equal(a: Path, b: Path) -> bool:
    """Byte for byte; .npz by their arrays (the zip members carry the time they were written)."""
    if a.suffix != ".npz":
        return filecmp.cmp(a, b, shallow=False)
    with np.load(a) as x, np.load(b) as y:
        return x.files == y.files and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x.files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the full reference data (default ../shared/data)")
    p.add_argument("--check", action="store_true", help="compare tests/data with a fresh cut instead of writing")
    args = p.parse_args(argv)
    if not args.source.is_dir():
        p.error(f"{args.source}: not a directory")
    if not args.check:
        make(args.source, HERE)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        make(args.source, Path(tmp))
        differ = same(Path(tmp), HERE)
    for name in differ:
        print(f"differs from a fresh cut: {name}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
