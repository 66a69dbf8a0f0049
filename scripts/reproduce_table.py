"""The paper's comparison table on one data set: zero-shot, scratch, full,
ELoRA, STR (L) and STR (H), several seeds, the same epochs and batch size.

    .venv/bin/python scripts/reproduce_table.py --model 7net-0 --name aspirin \
        --train ../shared/data/rmd17/rmd17_aspirin_train_01.npz \
        --test ../shared/data/rmd17/rmd17_aspirin_test_01.npz \
        --train-frames 40 --test-frames 100 --epochs 5 -o results/aspirin

Every method is an ordinary `sparse_eqv.finetune.run.finetune` run under
OUT/runs/<method>_seed<k>/ (a finished run is reused when the script is run
again, and an interrupted one resumes from its last checkpoint). Sub-sampled data files (seeded; the
validation frames come from the training file unless --valid is given) are
written to OUT/data/ as extxyz (splits drawn from one file are disjoint). Energies are compared after the per-element
E0 fit on the training frames that `finetune --e0s fit` does; the zero-shot
row gets the same fit (on the same training frames) so that it is compared
fairly. Writes OUT/table.md and OUT/table.json and prints the table:

    energy MAE meV/atom and force MAE meV/Å on the test frames, mean ± std
    over seeds; sparsity "total (layer)" in % (STR: layer = zeros among the
    targeted deltas; total = parameters left unchanged, frozen ones counted).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROWS = {
    "zero-shot": None,
    "scratch": dict(method="scratch"),
    "full": dict(method="full"),
    "elora": dict(method="elora"),
    "str-l": dict(method="str", threshold_decay=0.01),
    "str-h": dict(method="str", threshold_decay=0.3),
    "str-0": dict(method="str", threshold_decay=0.0),  # control: no sparsity pressure on the same targets
    "full+replay": dict(method="full", replay=True),  # with --replay FILE (pseudolabelled by the base)
    "str-h+replay": dict(method="str", threshold_decay=0.3, replay=True),
    "str-l+replay": dict(method="str", threshold_decay=0.01, replay=True),
}
LABELS = {"zero-shot": "Zero-shot", "scratch": "Scratch", "full": "Full FT", "elora": "ELoRA",
          "str-l": "STR (L: λτ=0.01)", "str-h": "STR (H: λτ=0.3)",
          "str-0": "STR (λτ=0, control)", "full+replay": "Full FT + replay", "str-h+replay": "STR (H) + replay",
          "str-l+replay": "STR (L) + replay"}


class _Pools:
    """Seeded draws without replacement from data files: splits that name
    the same file get disjoint frames."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.left: dict[Path, list] = {}

    def draw(self, path: Path, n: int | None) -> list:
        from sparse_eqv.data.readers import read_frames

        key = path.resolve()
        if key not in self.left:
            frames = read_frames(path)
            self.left[key] = [frames[i] for i in self.rng.permutation(len(frames))]
        left = self.left[key]
        n = len(left) if n is None else n
        if n > len(left):
            raise SystemExit(f"{path}: asked for {n} more frames, {len(left)} left after the other splits")
        self.left[key] = left[n:]
        return left[:n]


def _write_extxyz(path: Path, frames) -> Path:
    """Frames with their labels as extxyz (written once; atomically)."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from sparse_eqv.atomic_write import atomic_file

    images = []
    for frame in frames:
        atoms = frame.to_atoms()
        atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces,
                                           stress=frame.stress if frame.stress is not None else None)
        atoms.info["source"] = frame.source
        images.append(atoms)
    with atomic_file(path) as tmp:
        ase.io.write(tmp, images, format="extxyz")
    return path


def prepare_data(args, out: Path) -> dict[str, Path]:
    """Seeded sub-samples of the data files as extxyz under OUT/data
    (train first, then valid, then test; disjoint where files coincide)."""
    paths = {split: out / "data" / f"{split}.extxyz" for split in ("train", "valid", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    pools = _Pools(args.data_seed)
    train = pools.draw(args.train, args.train_frames)
    valid = pools.draw(args.valid or args.train, args.valid_frames)
    test = pools.draw(args.test, args.test_frames)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split, frames in (("train", train), ("valid", valid), ("test", test)):
        _write_extxyz(paths[split], frames)
    return paths


def model_dir_for(model: str, cache: Path) -> Path:
    """A converted model directory: `model` itself, or its conversion cached under `cache`."""
    from sparse_eqv.checkpoint import save_model
    from weights_convert.convert import convert

    if (Path(model) / "config.json").exists():
        return Path(model)
    target = cache / ("model-" + Path(model).name.replace(".", "_"))
    if not (target / "config.json").exists():
        config, variables = convert(model)
        save_model(target, config, variables, overwrite=True)
    return target


def zero_shot(model_dir: Path, data: dict[str, Path]) -> dict:
    """Test errors of the base model, energies after an E0 fit on the training frames."""
    from sparse_eqv.checkpoint import load_for_inference
    from sparse_eqv.data.readers import read_frames
    from sparse_eqv.finetune.e0s import composition, fit_e0_shift
    from sparse_eqv.finetune.losses import error_metrics
    from sparse_eqv.inference import Predictor

    config, variables = load_for_inference(model_dir)
    predictor = Predictor(config, variables)
    numbers = config["atomic_numbers"]
    train, test = read_frames(data["train"]), read_frames(data["test"])
    shift = fit_e0_shift(train, [p["energy"] for p in predictor.predict(train)], numbers)
    predictions = predictor.predict(test)
    return {"test": error_metrics(test, predictions, composition(test, numbers) @ shift),
            "sparsity": {"total_sparsity": 1.0}}


def run_one(row: str, seed: int, args, model_dir: Path, data: dict[str, Path], out: Path) -> dict:
    """metrics.json of one (method, seed) run; reused if it already finished."""
    from sparse_eqv.finetune.loop import TrainConfig
    from sparse_eqv.finetune.run import MethodOptions, default_lr, finetune

    run_dir = out / "runs" / f"{row}_seed{seed}"
    if (run_dir / "metrics.json").exists():
        return json.loads((run_dir / "metrics.json").read_text())
    spec = dict(ROWS[row])
    method = MethodOptions(method=spec.pop("method"))
    replay = args.replay if spec.pop("replay", False) else None
    if row.endswith("+replay") and replay is None:
        raise SystemExit(f"--methods {row} needs --replay FILE")
    lr = args.str_lr if method.method == "str" else args.lr
    config = TrainConfig(epochs=epochs_for(args, data), batch_size=args.batch_size, seed=seed,
                         lr=default_lr(method.method) if lr is None else lr,
                         score_lr=TrainConfig.score_lr if args.score_lr is None else args.score_lr,
                         schedule=args.schedule, replay_weight=args.replay_weight, **spec)
    resume = (run_dir / "checkpoints" / "last").exists()  # an interrupted run continues where it stopped
    return finetune(model_dir, run_dir, train=data["train"], valid=data["valid"], test=data["test"],
                    method=method, config=config, overwrite=not resume, resume=resume, progress=not args.quiet,
                    replay=replay)


def epochs_for(args, data: dict[str, Path]) -> int:
    """--epochs, or with --steps the epochs that make at least that many optimiser steps."""
    if args.steps is None:
        return args.epochs
    from sparse_eqv.data.readers import read_frames

    per_epoch = -(-len(read_frames(data["train"])) // args.batch_size)
    return -(-args.steps // per_epoch)


def _mean_std(values: list[float]) -> str:
    values = np.asarray(values, float)
    if values.size == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def table(results: dict[str, list[dict]]) -> tuple[str, dict]:
    """Markdown table and JSON summary from the runs' metrics."""
    lines = ["| method | E MAE (meV/atom) | F MAE (meV/Å) | sparsity % total (layer) | steps | wall (min) | seeds |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for row, runs in results.items():
        energy = [r["test"]["energy_mae"] for r in runs]
        forces = [r["test"]["forces_mae"] for r in runs]
        total = [100 * r["sparsity"]["total_sparsity"] for r in runs]
        layer = [100 * r["sparsity"]["layer_sparsity"] for r in runs if "layer_sparsity" in r["sparsity"]]
        sparsity = f"{_mean_std(total)}" + (f" ({_mean_std(layer)})" if layer else "")
        steps = [r["steps"] for r in runs if "steps" in r]
        wall = [r["session_wall_s"] / 60 for r in runs if "session_wall_s" in r]
        lines.append(f"| {LABELS[row]} | {_mean_std(energy)} | {_mean_std(forces)} | {sparsity} | "
                     f"{max(steps) if steps else '-'} | {f'{np.mean(wall):.1f}' if wall else '-'} | {len(runs)} |")
        summary[row] = {"energy_mae_meV_per_atom": energy, "forces_mae_meV_per_A": forces,
                        "total_sparsity_percent": total, "layer_sparsity_percent": layer,
                        "steps": steps, "wall_min": wall,
                        "s_per_epoch": [r["s_per_epoch"] for r in runs if r.get("s_per_epoch")]}
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint, bundled name (7net-0) or converted model dir")
    parser.add_argument("--name", required=True, help="data set name for the table")
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--valid", type=Path, default=None, help="default: frames held out of --train")
    parser.add_argument("--test", required=True, type=Path)
    parser.add_argument("--train-frames", type=int, required=True)
    parser.add_argument("--valid-frames", type=int, default=10)
    parser.add_argument("--test-frames", type=int, default=None, help="sub-sample (default: all that are left)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="instead of --epochs: at least this many optimiser steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="lr of the non-STR rows (default: finetune's)")
    parser.add_argument("--score-lr", type=float, default=None, help="STR score lr (default: finetune's)")
    parser.add_argument("--str-lr", type=float, default=None, help="lr of the STR rows' deltas (default: finetune's)")
    parser.add_argument("--schedule", default="cosine", choices=("plateau", "cosine", "constant"))
    parser.add_argument("--replay", type=Path, default=None, help="replay frames of the +replay rows (base pseudolabels)")
    parser.add_argument("--replay-weight", type=float, default=1.0)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("-o", "--output", required=True, type=Path)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    # Seeds of one method compile to the same program: reuse it from disk.
    jax.config.update("jax_compilation_cache_dir", str((args.output / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    started = time.perf_counter()
    rows = [r.strip() for r in args.methods.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; known: {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.output.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_for(args.model, args.output.parent)
    data = prepare_data(args, args.output)
    results: dict[str, list[dict]] = {}
    for row in rows:
        if row == "zero-shot":
            results[row] = [zero_shot(model_dir, data)]
            continue
        results[row] = []
        for seed in seeds:
            tic = time.perf_counter()
            results[row].append(run_one(row, seed, args, model_dir, data, args.output))
            print(f"{row} seed {seed}: F MAE {results[row][-1]['test']['forces_mae']:.1f} meV/Å "
                  f"({time.perf_counter() - tic:.0f} s)", flush=True)
    markdown, summary = table(results)
    wall = time.perf_counter() - started
    from sparse_eqv.data.readers import read_frames

    header = (f"**{args.name}** -- model {args.model}; train/valid/test frames "
              f"{len(read_frames(data['train']))}/{len(read_frames(data['valid']))}/{len(read_frames(data['test']))}; "
              f"{epochs_for(args, data)} epochs, batch {args.batch_size}, lr {args.lr or 'default'} "
              f"(STR {args.str_lr or 'default'}), "
              f"score lr {args.score_lr or 'default'}, "
              f"{args.schedule} schedule, seeds {args.seeds}; wall {wall / 60:.1f} min this invocation")
    print("\n" + header + "\n\n" + markdown)
    (args.output / "table.md").write_text(header + "\n\n" + markdown + "\n")
    (args.output / "table.json").write_text(json.dumps({
        "name": args.name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, jax {jax.__version__}",
        "wall_s": wall, "rows": summary, "options": {k: str(v) for k, v in vars(args).items()},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
