"""Time K STR variants in one vmapped run against K separate runs.

Both sides fine-tune the same model on the same frames with the same options;
the variants differ in lambda_tau (`--threshold-decay` list). The vmapped side
is `finetune(..., variants=...)` (one jitted step for all K), the separate side K calls
of `finetune` (each compiles its own step, as K CLI runs would), in one
process, one after the other. Reported per side: wall time of the whole call
(reading, E0 fit, compilation, training, writing), the first epoch (mostly
compilation) and the steady epochs (median over epochs 2..; all K variants
advanced by one epoch, validation and checkpoints included), and
compilations; then the compiled train step alone on one batch (K variants in
one step vs K plain steps). The script also checks that both sides end with
the same fine-tuned params (max relative difference).

    .venv/bin/python scripts/bench_variants.py --size tiny -k 3 --epochs 3 -o bench_variants.json
    .venv/bin/python scripts/bench_variants.py --model MODEL_DIR --train DATA ...

Models: --size tiny (4 channels, l <= 1, 2 layers: the tests' net) or mid
(16 channels, l <= 2, 3 layers), SevenNet architecture with random weights;
or --model, any converted model directory.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from sparse_eqv.testing import tiny_sevenn_config, write_extxyz

REPO = Path(__file__).resolve().parents[1]

TINY = tiny_sevenn_config()  # the tests' net


def _mid_layer(irreps_in: str, last: bool) -> dict:
    gate = ({"scalars": "16x0e", "act_scalars": ["silu"], "gates": "", "act_gates": [], "gated": ""} if last else
            {"scalars": "16x0e", "act_scalars": ["silu"], "gates": "8x0e", "act_gates": ["sigmoid"], "gated": "4x1o+4x2e"})
    return {"irreps_in": irreps_in, "gate": gate, "radial": {"hidden": [8, 32], "kind": "e3nn", "act": "silu"},
            "self_connection": "tensor_product" if last else "linear", "sort_instructions": True}


MID = {
    **TINY,
    "r_max": 5.0,
    "embedding": {"features": 16, "scale": 0.5, "node_attrs": "one_hot"},
    "radial_basis": {"num_basis": 8, "cutoff": "polynomial", "cutoff_arg": 6.0},
    "irreps_sh": "1x0e+1x1o+1x2e",
    "layers": [_mid_layer("16x0e", False), _mid_layer("16x0e+4x1o+4x2e", False), _mid_layer("16x0e+4x1o+4x2e", True)],
    "readout": {"dims": [16, 8, 1], "kind": "e3nn", "act": None},
}


def make_model(size: str, directory: Path) -> Path:
    """A random-weight model directory of the given size."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sparse_eqv.checkpoint import save_model
    from sparse_eqv.models import build_model

    config = {"tiny": TINY, "mid": MID}[size]
    module = build_model(config)
    variables = jax.jit(module.init)(
        jax.random.PRNGKey(0), jnp.ones((3, 3)), jnp.zeros(2, jnp.int32), jnp.array([0, 1, 0]), jnp.array([1, 0, 1])
    )
    save_model(directory, config, jax.tree.map(np.asarray, variables), overwrite=True)
    return directory


def write_frames(source: Path, n: int, path: Path) -> Path:
    """The first n labelled frames of `source` as extxyz."""
    from sparse_eqv.data.readers import read_frames

    return write_extxyz(path, read_frames(source)[:n])


def epoch_rows(run_dir: Path) -> list[dict]:
    """log.csv's epoch times of a run directory."""
    with (run_dir / "log.csv").open() as f:
        return [{"epoch_s": float(row["epoch_s"])} for row in csv.DictReader(f)]


def steady(rows: list[dict]) -> float | None:
    """Median epoch time after the first (compiling) epoch."""
    import numpy as np

    times = [row["epoch_s"] for row in rows[1:]]
    return float(np.median(times)) if times else None


def time_steps(model: Path, train: Path, decays: list[float], config, repeats: int) -> dict:
    """Seconds per optimiser step on one batch, compiled: K variants in one vmapped
    step vs one plain step (times K for K separate runs); median of `repeats`."""
    import numpy as np

    from sparse_eqv.checkpoint import load_model
    from sparse_eqv.data.readers import read_frames
    from sparse_eqv.finetune.loop import Trainer, make_graphs
    from sparse_eqv.finetune.run import MethodOptions, make_method, make_variants
    from sparse_eqv.models import build_model

    model_config, variables = load_model(model)
    graphs = make_graphs(read_frames(train), model_config["atomic_numbers"], float(model_config["r_max"]))
    module, params = build_model(model_config), variables["params"]
    method = make_method(MethodOptions(method="str"), params, model_config)
    indices = list(range(config.batch_size))
    cutoff = float(model_config["r_max"])
    variant = Trainer(module, variables["constants"], method, params, config, make_variants(decays, [config.seed]),
                      cutoff=cutoff)
    single = Trainer(module, variables["constants"], method, params, config, cutoff=cutoff)
    out = {}
    for label, trainer, step in (
        ("vmapped_step_s", variant, lambda t, st, b: t.train_step(st, b)),
        ("single_step_s", single, lambda t, st, b: t.train_step(st, b)),
    ):
        state = trainer.initial_state()
        batch = trainer.stack(graphs, indices)[0]
        started = time.perf_counter()
        step(trainer, state, batch)  # compiles
        out[label.replace("step_s", "compile_s")] = time.perf_counter() - started
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step(trainer, state, batch)  # returns host floats: the step has finished
            times.append(time.perf_counter() - started)
        out[label] = float(np.median(times))
    return out


def max_relative_difference(a_dir: Path, b_dir: Path) -> float:
    import numpy as np
    from flax import traverse_util

    from sparse_eqv.checkpoint import load_model

    a = traverse_util.flatten_dict(load_model(a_dir)[1])
    b = traverse_util.flatten_dict(load_model(b_dir)[1])
    return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(a[k])), 1e-300)) for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "mid"), default="tiny", help="built-in random-weight model")
    parser.add_argument("--model", type=Path, default=None, help="a converted model directory instead")
    parser.add_argument("--train", type=Path, default=REPO.parent / "shared" / "data" / "sse-pbe" / "LiGePS-init.system")
    parser.add_argument("--frames", type=int, default=10, help="frames taken from --train (20%% validate)")
    parser.add_argument("-k", type=int, default=3, help="number of variants")
    parser.add_argument("--decays", default=None, help="comma-separated lambda_tau values (default: K from 0.01 to 0.3)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--step-repeats", type=int, default=10, help="timed steps per side (0: no step timing)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary dir)")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_variants.json"))
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    from sparse_eqv.finetune.loop import TrainConfig
    from sparse_eqv.finetune.run import finetune, make_variants, parse_values, variant_names

    decays = (parse_values(args.decays, "--decays", float) if args.decays
              else [float(x) for x in np.round(np.geomspace(0.01, 0.3, args.k), 4)])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_variants_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or make_model(args.size, workdir / "model")
    train = write_frames(args.train, args.frames, workdir / "train.xyz")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.01, seed=0, checkpoint_every=10**6)
    common = dict(train=train, valid_fraction=0.2, config=config, overwrite=True, progress=False)
    load = [os.getloadavg()[0]]

    started = time.perf_counter()
    summary = finetune(model, workdir / "vmapped", variants=make_variants(decays, [config.seed]), **common)
    vmapped_wall = time.perf_counter() - started
    names = variant_names(make_variants(decays, [config.seed]))
    rows = epoch_rows(workdir / "vmapped" / names[0])  # wall times of the shared run
    vm = {"wall_s": vmapped_wall, "first_epoch_s": rows[0]["epoch_s"], "steady_epoch_s": steady(rows),
          "compiles": sum(summary["compiles"].values())}
    load.append(os.getloadavg()[0])

    separate = {"wall_s": 0.0, "first_epoch_s": 0.0, "steady_epoch_s": None, "compiles": 0}
    diffs = []
    for decay, name in zip(decays, names):
        started = time.perf_counter()
        run_config = dataclasses.replace(config, threshold_decay=decay)
        result = finetune(model, workdir / f"separate_{name}", **{**common, "config": run_config})
        separate["wall_s"] += time.perf_counter() - started
        run_rows = epoch_rows(workdir / f"separate_{name}")
        separate["first_epoch_s"] += run_rows[0]["epoch_s"]
        separate["steady_epoch_s"] = None if steady(run_rows) is None else (separate["steady_epoch_s"] or 0.0) + steady(run_rows)
        separate["compiles"] += sum(result["compiles"].values())
        diffs.append(max_relative_difference(workdir / f"separate_{name}" / "model", workdir / "vmapped" / name / "model"))
    load.append(os.getloadavg()[0])
    steps = time_steps(model, train, decays, config, args.step_repeats) if args.step_repeats else {}
    load.append(os.getloadavg()[0])

    report = {
        "settings": {"model": str(args.model) if args.model else args.size, "k": len(decays), "decays": decays,
                     "epochs": args.epochs, "batch_size": args.batch_size, "data": str(args.train),
                     "n_frames": json.loads((workdir / "vmapped" / names[0] / "run.json").read_text())["n_frames"]},
        "vmapped": vm,
        "separate": separate,
        "speedup": {key: separate[key] / vm[key] for key in ("wall_s", "first_epoch_s", "steady_epoch_s")
                    if vm[key] and separate[key]},
        "train_step": steps,
        "max_relative_param_difference": max(diffs),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "jax": jax.__version__, "device": str(jax.devices()[0]), "load_average_1min": load},
        "workdir": str(workdir),
    }
    args.output.write_text(json.dumps(report, indent=1))

    header = f"{'':12s} {'wall s':>9s} {'1st epoch s':>12s} {'epoch s (steady)':>17s} {'compilations':>13s}"
    print(f"{len(decays)} STR variants (lambda_tau {', '.join(map(str, decays))}), {args.epochs} epochs, "
          f"{report['settings']['n_frames']['train']} training frames, model {report['settings']['model']}")
    print(header)
    for label, side in (("vmapped", vm), (f"{len(decays)} separate", separate)):
        steady_s = "n/a" if side["steady_epoch_s"] is None else f"{side['steady_epoch_s']:.2f}"
        print(f"{label:12s} {side['wall_s']:9.1f} {side['first_epoch_s']:12.1f} {steady_s:>17s} {side['compiles']:13d}")
    print("speedup      " + ", ".join(f"{k} {v:.2f}x" for k, v in report["speedup"].items()))
    if steps:
        k = len(decays)
        print(f"train step (one batch, compiled): {k} variants vmapped {1e3 * steps['vmapped_step_s']:.1f} ms, "
              f"{k} x single {1e3 * k * steps['single_step_s']:.1f} ms ({k} x {1e3 * steps['single_step_s']:.1f}): "
              f"{k * steps['single_step_s'] / steps['vmapped_step_s']:.2f}x")
    print(f"same params: max relative difference {report['max_relative_param_difference']:.1e}; "
          f"load average {', '.join(f'{x:.1f}' for x in load)} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
