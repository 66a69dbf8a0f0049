"""Energy error of finished runs after an E0 refit on their own training frames.

Fine-tuning fits the per-element reference energies (E0s) before training
(`--e0s fit`); the network may then drift by a per-element offset that the
force-weighted loss hardly sees. This measures what a second least-squares fit
of those offsets on the run's training frames (never its test frames) would
give: the test energy MAE before and after, meV/atom, per run. Runs with a
validation file given (as scripts/reproduce_table.py writes them) only: their
training file is exactly what they trained on.

    .venv/bin/python scripts/e0_refit.py runs/conv/aspirin/runs/* [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def refit(run: Path) -> dict:
    """{"train_file", "test_file", "raw" / "refit": test E MAE meV/atom, "shift_eV": per element}."""
    import ase.data

    from sparse_eqv.checkpoint import load_model
    from sparse_eqv.finetune.e0s import composition, fit_e0_shift
    from sparse_eqv.finetune.evaluate import evaluate
    from sparse_eqv.finetune.losses import error_metrics

    info = json.loads((run / "run.json").read_text())
    if info["data"]["valid"] is None or info["data"]["test"] is None:
        raise SystemExit(f"{run}: needs a run with --valid and --test files")
    numbers = load_model(run / "model")[0]["atomic_numbers"]
    train = evaluate(run, info["data"]["train"])
    shift = fit_e0_shift(train.frames, [p["energy"] for p in train.predictions], numbers)
    test = evaluate(run, info["data"]["test"])
    shifted = error_metrics(test.frames, test.predictions, composition(test.frames, numbers) @ shift)
    return {
        "train_file": info["data"]["train"], "test_file": info["data"]["test"],
        "raw": test.metrics["raw"]["energy_mae"], "refit": shifted["energy_mae"],
        "shift_eV": {ase.data.chemical_symbols[z]: float(s) for z, s in zip(numbers, shift) if s != 0.0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_enable_x64", True)
    results = {}
    print(f"{'run':50s} {'test E MAE':>11s} {'after refit':>12s}  (meV/atom)  shift (eV)")
    for run in args.runs:
        if not (run / "metrics.json").exists():
            continue
        r = results[str(run)] = refit(run)
        shifts = " ".join(f"{k} {v:+.4f}" for k, v in r["shift_eV"].items())
        print(f"{str(run):50s} {r['raw']:11.2f} {r['refit']:12.2f}  {shifts}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
