"""The robustness table of a results set: `sparse-eqv robustness` on each
method's run of a `reproduce_table.py` output, side by side.

    .venv/bin/python scripts/robustness_table.py runs/conv/emt --methods full,full+replay,elora,str-l,str-h,str-h+replay \
        --ood ../shared/data/cu/mlearn_Cu_test.json ../shared/data/rmd17/rmd17_ethanol_test_01.npz --md-steps 200

Per method (its seed-0 run under OUT/runs/<method>_seed0): layer sparsity,
the in-domain test force MAE, and per out-of-domain file the force error of
base -> fine-tuned against the file's labels and the label-free force drift
from the base; the dimer pairs where fine-tuning opened a hole; how many MD
runs stayed physical. Each file is sub-sampled to --frames frames (seeded,
written once under OUT/ood/). Writes OUT/robustness.md and
OUT/robustness.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def subsample(path: Path, n: int, out: Path) -> Path:
    """The first `n` frames of a seeded permutation of `path`, as extxyz under `out` (written once)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from reproduce_table import _write_extxyz

    from sparse_eqv.data.readers import read_frames

    target = out / f"{path.name.split('.')[0]}.extxyz"
    if not target.exists():
        frames = read_frames(path)
        order = np.random.default_rng(0).permutation(len(frames))[:n]
        out.mkdir(parents=True, exist_ok=True)
        _write_extxyz(target, [frames[i] for i in sorted(order)])
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table_dir", type=Path, help="output directory of reproduce_table.py")
    parser.add_argument("--methods", required=True, help="comma list of row names (runs/<row>_seed0)")
    parser.add_argument("--ood", nargs="+", type=Path, default=[], help="out-of-domain data files")
    parser.add_argument("--frames", type=int, default=50, help="frames drawn from each out-of-domain file")
    parser.add_argument("--md-steps", type=int, default=0)
    parser.add_argument("--md-frames", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=300.0)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    # Every run of a table is the same architecture: its compiled predictions come back from disk.
    jax.config.update("jax_compilation_cache_dir", str((args.table_dir / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from sparse_eqv.robustness import curve_features, robustness

    started = time.perf_counter()
    ood = [subsample(path, args.frames, args.table_dir / "ood") for path in args.ood]
    test = args.table_dir / "data" / "test.extxyz"
    rows = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        run = args.table_dir / "runs" / f"{method}_seed0"
        cache = run / "robustness" / "result.json"
        if cache.exists() and json.loads(cache.read_text()).get("data_files") == [str(p) for p in [test, *ood]]:
            rows[method] = json.loads(cache.read_text())
            for dimer in rows[method]["dimers"]:  # the curves are kept: their features follow the current definition
                for name in ("base", "finetuned"):
                    dimer[name].update(curve_features(np.array(dimer["r"]), np.array(dimer[name]["energy"])))
                dimer["new_hole"] = dimer["finetuned"]["hole"] and not dimer["base"]["hole"]
            continue
        result = robustness(run, [test, *ood], md_steps=args.md_steps, md_frames=args.md_frames,
                            temperature=args.temperature, progress=lambda message: None)
        result["data_files"] = [str(p) for p in [test, *ood]]
        result["metrics"] = json.loads((run / "metrics.json").read_text())
        cache.write_text(json.dumps(result, indent=1))
        rows[method] = result
        print(f"{method}: done ({time.perf_counter() - started:.0f} s)", flush=True)

    names = [p.name.split(".")[0] for p in ood]
    header = ("| method | layer sparsity % | in-domain test F MAE | "
              + " | ".join(f"{n}: F MAE base → tuned / drift F" for n in names)
              + " | new dimer holes | MD physical |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for method, result in rows.items():
        metrics = result["metrics"]
        layer = metrics["sparsity"].get("layer_sparsity")
        cells = [method, "-" if layer is None else f"{100 * layer:.1f}", f"{metrics['test']['forces_mae']:.1f}"]
        for entry in result["data"][1:]:
            base, tuned = entry["base"]["raw"]["forces_mae"], entry["finetuned"]["raw"]["forces_mae"]
            cells.append(f"{base:.1f} → {tuned:.1f} ({100 * (tuned / base - 1):+.0f} %) / {entry['drift']['forces_mae']:.1f}")
        holes = [d["pair"] for d in result["dimers"] if d["new_hole"]]
        cells.append(", ".join(holes) or "none")
        md = [pair["finetuned"]["physical"] for pair in result["md"]]
        cells.append(f"{sum(md)}/{len(md)}" if md else "-")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    base_holes = sorted({d["pair"] for r in rows.values() for d in r["dimers"] if d["base"]["hole"]})
    note = (f"F MAE and drift in meV/Å; base model's dimer curves with a hole already: {', '.join(base_holes) or 'none'}; "
            f"wall {time.perf_counter() - started:.0f} s")
    print(table + "\n\n" + note)
    (args.table_dir / "robustness.md").write_text(table + "\n\n" + note + "\n")
    (args.table_dir / "robustness.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
