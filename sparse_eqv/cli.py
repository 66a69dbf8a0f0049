"""The `sparse-eqv` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sparse_eqv.errors import SparseEqvError


def _enable_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")


def cmd_convert(args: argparse.Namespace) -> None:
    from sparse_eqv.checkpoint import save_model
    from weights_convert.convert import convert

    started = time.perf_counter()
    config, variables = convert(
        args.checkpoint, dtype=args.dtype, head=args.head, trust=args.trust_checkpoint
    )
    save_model(args.output, config, variables, overwrite=args.overwrite)
    n_params = sum(int(getattr(x, "size", 1)) for x in _leaves(variables.get("params", {})))
    print(
        f"converted {config['source']['kind']} model {args.checkpoint} -> {args.output} "
        f"({n_params} parameters, {len(config['atomic_numbers'])} elements, r_max {config['r_max']} Å, "
        f"{config['dtype']}, {time.perf_counter() - started:.1f} s)"
    )


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def cmd_predict(args: argparse.Namespace) -> None:
    import ase
    import ase.io
    from tqdm import tqdm

    from sparse_eqv.atomic_write import atomic_file
    from sparse_eqv.checkpoint import load_model
    from sparse_eqv.data.readers import read_frames
    from sparse_eqv.inference import Predictor

    config, variables = load_model(args.model)
    frames = read_frames(args.data, energy_key=args.energy_key, forces_key=args.forces_key, stress_key=args.stress_key)
    predictor = Predictor(config, variables)
    started = time.perf_counter()
    with tqdm(total=len(frames), unit="frame", desc="predict", disable=args.quiet) as bar:
        results = predictor.predict(frames, max_atoms=args.batch_atoms, progress=bar)
    images = []
    for frame, result in zip(frames, results):
        atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        atoms.info["energy"] = result["energy"]
        atoms.arrays["forces"] = result["forces"]
        if "stress" in result:
            atoms.info["stress"] = result["stress"]
        images.append(atoms)
    with atomic_file(args.output) as tmp:
        ase.io.write(tmp, images, format="extxyz")
    elapsed = time.perf_counter() - started
    print(
        f"wrote {len(images)} frames to {args.output} ({elapsed:.1f} s, "
        f"{len(predictor.budgets)} compilation(s))"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-eqv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="torch checkpoint (MACE .model, nequip .ckpt/.nequip.zip, SevenNet .pth) -> Flax model dir")
    p.add_argument("checkpoint", help="checkpoint file, or a bundled SevenNet name such as 7net-0")
    p.add_argument("-o", "--output", required=True, type=Path, help="model directory to write")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--head", default=None, help="head of a multi-head model (default: the only one)")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="accept globals outside the allowlist (pickles can run code; see README, 'Security')",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("predict", help="energies, forces and stress of every frame in a data file")
    p.add_argument("model", type=Path, help="model directory (from convert)")
    p.add_argument("--data", required=True, type=Path, help="extxyz, rMD17 .npz, DeePMD dir or mlearn .json")
    p.add_argument("-o", "--output", required=True, type=Path, help="extxyz file to write")
    p.add_argument("--energy-key", default="energy")
    p.add_argument("--forces-key", default="forces")
    p.add_argument("--stress-key", default="stress")
    p.add_argument("--batch-atoms", type=int, default=1024, help="atoms per batch (lower it if memory runs out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _enable_x64()
    try:
        args.func(args)
    except SparseEqvError as error:
        print(f"sparse-eqv {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
