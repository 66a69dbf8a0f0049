"""How the cost of one prediction grows with atoms and with edges (issue 7).

    python scripts/bench_scaling.py MODEL [--dtype float32|float64] [--repeat 3] [--json OUT]

MODEL: a checkpoint `sparse-eqv convert` reads (a MACE .model, a SevenNet
name such as 7net-0, ...). Frames: rattled
fcc Cu supercells of 2x2x2, 3x3x3 and 4x4x4 cubic cells (32, 108, 256
atoms) at the PBE lattice constant, and the 3x3x3 cell compressed by 30 %
in volume (more edges per atom at the same atom count). Each frame is
predicted (energy, forces, stress) by the library's `Predictor` after one
compiling call; reported per frame: atoms, edges, median wall seconds and
CPU seconds (all threads) over --repeat calls, and CPU ms per atom and
per 1000 edges, so a linear cost shows as a flat column (CPU time, unlike
wall time, is not inflated when other processes share the cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

LATTICE_CU = 3.63  # Å, fcc Cu (PBE)


def frames() -> dict:
    """Name -> Frame: the three supercells and the compressed one."""
    from ase.build import bulk

    from sparse_eqv.data.frames import Frame

    out = {}
    for reps, squeeze in ((2, 1.0), (3, 1.0), (4, 1.0), (3, 0.7 ** (1 / 3))):
        atoms = bulk("Cu", "fcc", a=LATTICE_CU * squeeze, cubic=True).repeat(reps)
        atoms.rattle(0.05, seed=reps)
        name = f"Cu {len(atoms)} at." + (" (-30% volume)" if squeeze < 1 else "")
        out[name] = Frame(atoms.numbers, atoms.positions, np.asarray(atoms.cell), atoms.pbc, source=name)
    return out


def measure(model: str, dtype: str, repeat: int) -> list[dict]:
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    from sparse_eqv.inference import Predictor
    from weights_convert.convert import convert

    config, variables = convert(model, dtype=dtype)
    predictor = Predictor(config, variables)
    rows = []
    for name, frame in frames().items():
        graph = predictor.batch([predictor.graph(frame)])
        predictor.predict_graph(graph)  # compiles
        walls, cpus = [], []
        for _ in range(repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            predictor.predict_graph(graph)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        atoms, edges = frame.num_atoms, int(graph.n_edge[0])
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        rows.append({"frame": name, "atoms": atoms, "edges": edges, "wall_s": wall, "cpu_s": cpu,
                     "cpu_ms_per_atom": 1e3 * cpu / atoms, "cpu_ms_per_kedge": 1e6 * cpu / edges})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'frame':26s}{'atoms':>7s}{'edges':>8s}{'wall s':>9s}{'CPU s':>9s}{'CPU ms/atom':>13s}{'CPU ms/1k edges':>16s}"]
    for r in rows:
        lines.append(f"{r['frame']:26s}{r['atoms']:7d}{r['edges']:8d}{r['wall_s']:9.3f}{r['cpu_s']:9.3f}"
                     f"{r['cpu_ms_per_atom']:13.2f}{r['cpu_ms_per_kedge']:16.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = measure(args.model, args.dtype, args.repeat)
    text = table(rows)
    print(f"{args.model}, {args.dtype}, median of {args.repeat} calls after a compiling one")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "dtype": args.dtype, "rows": rows, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
