"""Time energy/forces/stress predictions of a MACE model: the converted Flax model, optionally mace-torch too.

    python scripts/time_predict.py MODEL.model FRAMES [--head H] [--dtype float64|float32]
                                   [--batch 1] [--frames 8] [--repeat 5] [--torch PYTHON] [--json OUT]

FRAMES is anything `sparse_eqv.data.readers.read_frames` reads. The Flax
model is converted with `weights_convert.mace.convert`; frames are grouped
into batches of --batch, all padded to one budget so that one compilation
serves every batch. Reported: conversion, compilation (once) and the median
over --repeat passes of the steady-state time per batch, per frame and per
atom. With --torch PYTHON (the interpreter of an environment with mace-torch,
e.g. .venv-mace/bin/python), the same frames and batches are timed with
mace-torch in a subprocess (this file re-run with --torch-side), and both
predictions are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def time_jax(args) -> dict:
    """Convert, compile once, then time every batch --repeat times (JAX, default device)."""
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph
    from sparse_eqv.data.readers import read_frames
    from sparse_eqv.models import build_model
    from sparse_eqv.potential import energy_forces_stress
    from weights_convert.mace import convert

    start = time.perf_counter()
    config, variables = convert(args.model, dtype=args.dtype, head=args.head)
    convert_s = time.perf_counter() - start
    frames = read_frames(args.frames_path)[: args.frames]
    graphs = [frame_to_graph(f, config["atomic_numbers"], config["r_max"]) for f in frames]
    groups = _batches(len(graphs), args.batch)
    sizes = [(sum(graphs[i].n_node[0] for i in g), sum(graphs[i].n_edge[0] for i in g)) for g in groups]
    budget = GraphBudget.round_up(max(n for n, _ in sizes), max(e for _, e in sizes), args.batch)
    dtype = np.dtype(args.dtype)

    def as_dtype(batch):
        return batch._replace(
            nodes={**batch.nodes, "positions": batch.nodes["positions"].astype(dtype)},
            edges={**batch.edges, "shifts": batch.edges["shifts"].astype(dtype)},
            globals={**batch.globals, "cell": batch.globals["cell"].astype(dtype)},
        )

    batches = [as_dtype(batch_graphs([graphs[i] for i in g], budget)) for g in groups]
    module = build_model(config)
    predict = jax.jit(lambda v, g: energy_forces_stress(module.apply, v, g, cutoff=config["r_max"]))
    start = time.perf_counter()
    compiled = predict.lower(variables, batches[0]).compile()
    compile_s = time.perf_counter() - start
    passes, outputs = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        outputs = [jax.block_until_ready(compiled(variables, b)) for b in batches]
        passes.append(time.perf_counter() - start)
    energies = np.concatenate([np.asarray(o["energy"])[: len(g)] for o, g in zip(outputs, groups)])
    return {
        "backend": f"jax ({jax.devices()[0].platform}, {args.dtype})",
        "convert_s": convert_s,
        "compile_s": compile_s,
        "pass_s": statistics.median(passes),
        "energy": energies.tolist(),
        "n_frames": len(frames),
        "n_atoms": int(sum(f.num_atoms for f in frames)),
        "n_batches": len(batches),
    }


def time_torch_side(args) -> dict:
    """The same frames and batches with mace-torch (run inside the mace environment)."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import ase.io
    import torch
    from mace import data as mace_data
    from mace.tools import torch_geometric, utils

    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    torch.set_default_dtype(dtype)
    start = time.perf_counter()
    model = torch.load(args.model, map_location="cpu", weights_only=False).to(dtype)
    load_s = time.perf_counter() - start
    heads = list(getattr(model, "heads", ["Default"]))
    head = args.head or heads[0]
    atoms_list = ase.io.read(args.frames_path, index=":")[: args.frames]
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    graphs = [
        mace_data.AtomicData.from_config(
            mace_data.config_from_atoms(atoms, key_specification=mace_data.KeySpecification(), head_name=head),
            z_table=z_table, cutoff=float(model.r_max), heads=heads,
        )
        for atoms in atoms_list
    ]
    batches = [
        next(iter(torch_geometric.dataloader.DataLoader([graphs[i] for i in g], batch_size=len(g), shuffle=False)))
        for g in _batches(len(graphs), args.batch)
    ]

    def run(batch):
        return model(batch.to_dict(), compute_stress=True, training=False)["energy"].detach()

    run(batches[0])  # warm-up
    passes, energies = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        energies = [run(b) for b in batches]
        passes.append(time.perf_counter() - start)
    return {
        "backend": f"mace-torch (cpu, {args.dtype}, {torch.get_num_threads()} threads)",
        "convert_s": load_s,
        "compile_s": 0.0,
        "pass_s": statistics.median(passes),
        "energy": torch.cat(energies).tolist(),
        "n_frames": len(atoms_list),
        "n_atoms": int(sum(len(a) for a in atoms_list)),
        "n_batches": len(batches),
    }


def _extxyz_copy(frames_path: str, n: int, directory: Path) -> Path:
    """The frames as extxyz (for the torch side), read with sparse_eqv's readers."""
    import ase.io

    from sparse_eqv.data.readers import read_frames

    path = directory / "frames.extxyz"
    ase.io.write(path, [f.to_atoms() for f in read_frames(frames_path)[:n]], format="extxyz")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="mace .model file")
    parser.add_argument("frames_path", metavar="FRAMES", help="frames file or DeePMD directory")
    parser.add_argument("--head")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    parser.add_argument("--batch", type=int, default=1, help="frames per batch")
    parser.add_argument("--frames", type=int, default=8, help="first N frames")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--torch", metavar="PYTHON", help="also time mace-torch with this interpreter")
    parser.add_argument("--torch-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.torch_side:
        print(json.dumps(time_torch_side(args)))
        return
    if not args.torch:
        results = [time_jax(args)]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            frames = _extxyz_copy(args.frames_path, args.frames, Path(tmp))
            # Both sides read the extxyz copy (its positions are rounded to 1e-8 Å).
            results = [time_jax(argparse.Namespace(**{**vars(args), "frames_path": str(frames)}))]
            command = [args.torch, __file__, args.model, str(frames), "--torch-side", "--dtype", args.dtype,
                       "--batch", str(args.batch), "--frames", str(args.frames), "--repeat", str(args.repeat)]
            if args.head:
                command += ["--head", args.head]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"mace-torch side failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for r in results:
        per_frame = 1e3 * r["pass_s"] / r["n_frames"]
        per_atom = 1e6 * r["pass_s"] / r["n_atoms"]
        print(
            f"{r['backend']}: load/convert {r['convert_s']:.1f} s, compile {r['compile_s']:.1f} s, "
            f"{r['n_batches']} batches of {args.batch}: {per_frame:.1f} ms/frame, {per_atom:.1f} µs/atom"
        )
    if len(results) == 2:
        diff = np.abs(np.array(results[0]["energy"]) - np.array(results[1]["energy"])).max()
        print(f"max |E_jax - E_torch| = {diff:.2e} eV; speed-up {results[1]['pass_s'] / results[0]['pass_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
