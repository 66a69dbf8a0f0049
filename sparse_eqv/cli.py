"""The `sparse-eqv` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sparse_eqv.errors import SparseEqvError


# Layer sparsity (zeros among the targeted deltas) from which on a run is in the paper's high-sparsity
# regime (its "H" setting leaves 82-90 % of the deltas at zero).
REGIME_LAYER_SPARSITY = 0.8


def _enable_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")


def cmd_convert(args: argparse.Namespace) -> None:
    from sparse_eqv.checkpoint import save_model
    from weights_convert.convert import convert, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    started = time.perf_counter()
    config, variables = convert(checkpoint, dtype=args.dtype, head=args.head, trust=args.trust_checkpoint)
    if args.magmom_head is not None:
        config, variables = _attach_magmom_head(config, variables, args.magmom_head)
    save_model(args.output, config, variables, overwrite=args.overwrite)
    n_params = sum(int(getattr(x, "size", 1)) for x in _leaves(variables.get("params", {})))
    print(
        f"converted {config['source']['kind']} model {_named(args.checkpoint, checkpoint)} -> {args.output} "
        f"({n_params} parameters, {len(config['atomic_numbers'])} elements, r_max {config['r_max']} Å, "
        f"{config['dtype']}, {time.perf_counter() - started:.1f} s)"
    )


def _named(given: str, path: Path) -> str:
    """`given`, followed by the file it resolved to when that is another (a model name)."""
    return given if Path(given) == path else f"{given} ({path})"


def _attach_magmom_head(config, variables, path: Path):
    from sparse_eqv.errors import CheckpointError
    from sparse_eqv.models import attach_head
    from weights_convert.magmom_head import read_head

    head = read_head(path)
    if head is None:
        raise CheckpointError(f"{path}: holds no magnetic-moment head")
    print(f"attached the {head[0]['kind']} magnetic-moment head from {path}")
    return attach_head(config, variables, *head)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def cmd_predict(args: argparse.Namespace) -> None:
    import ase
    import ase.io
    from tqdm import tqdm

    from sparse_eqv.atomic_write import atomic_file
    from sparse_eqv.checkpoint import load_for_inference
    from sparse_eqv.data.readers import read_frames
    from sparse_eqv.inference import Predictor

    config, variables = load_for_inference(args.model)
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
        if "magmoms" in result:
            atoms.arrays["magmoms"] = result["magmoms"]
        images.append(atoms)
    with atomic_file(args.output) as tmp:
        ase.io.write(tmp, images, format="extxyz")
    elapsed = time.perf_counter() - started
    print(
        f"wrote {len(images)} frames to {args.output} ({elapsed:.1f} s, "
        f"{len(predictor.budgets)} compilation(s))"
    )


# Options config.yaml leaves out: they act on the run directory of one invocation (a repeat with
# `--config RUN_DIR/config.yaml -o NEW` must neither resume nor overwrite NEW unless told so).
_NOT_RECORDED = ("overwrite", "resume")
RUN_CONFIG_FILE = "config.yaml"


def cmd_finetune(args: argparse.Namespace) -> None:
    from sparse_eqv.config_file import resolve
    from sparse_eqv.finetune.losses import LossWeights
    from sparse_eqv.finetune.loop import TrainConfig
    from sparse_eqv.finetune.run import (
        MethodOptions, default_lr, finetune, make_variants, parse_values, summary_table,
    )
    from sparse_eqv.finetune.str import SCORE_LR

    args = resolve(args)  # defaults < --config FILE < flags given here
    decays = parse_values(args.threshold_decay, "--threshold-decay", float)
    seeds = [args.seed] if args.seeds is None else parse_values(args.seeds, "--seeds", int)
    if args.distributed or args.coordinator is not None:
        from sparse_eqv import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    method = MethodOptions(
        method=args.method, targets=tuple(args.targets), per_path=args.per_path,
        delta_std=args.delta_std, init_threshold=args.init_threshold, rank=args.rank, alpha=args.alpha,
    )
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=default_lr(args.method) if args.lr is None else args.lr,
        seed=seeds[0], score_lr=SCORE_LR if args.score_lr is None else args.score_lr,
        threshold_decay=decays[0], dense_weight_decay=args.weight_decay, clip_norm=args.clip_norm,
        schedule=args.schedule, patience=args.patience, ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every, dense_lr=args.dense_lr,
        weights=LossWeights(args.energy_weight, args.forces_weight, args.stress_weight, args.huber_delta,
                            magmoms=args.magmom_weight),
        replay_weight=args.replay_weight,
    )
    variants = make_variants(decays, seeds) if len(decays) * len(seeds) > 1 else None
    record = _config_recorder(args)
    result = finetune(
        args.model, args.output, train=args.train, valid=args.valid, valid_fraction=args.valid_fraction,
        test=args.test, method=method, config=config, variants=variants, e0s=args.e0s, overwrite=args.overwrite,
        resume=args.resume, n_devices=args.devices, read_options=_read_options(args), progress=not args.quiet,
        magmom=args.magmom, replay=args.replay, replay_labels=args.replay_labels, on_checkpoint=record,
        tensorboard=args.tensorboard,
    )
    record()
    if variants is not None:
        print(summary_table(result))
        print(f"{len(variants)} variants in one run, {result['train_wall_s']:.1f} s training, "
              f"{sum(result['compiles'].values())} compilation(s) -> {args.output}/<variant>")
        return
    valid, spars = result["valid"], result["sparsity"]
    layer = f", layer sparsity {spars['layer_sparsity']:.1%}" if "layer_sparsity" in spars else ""
    print(
        f"{args.method}: best epoch {result['best_epoch']}/{result['epochs']}, valid E MAE "
        f"{_fmt(valid['energy_mae'])} meV/atom, F MAE {_fmt(valid['forces_mae'])} meV/Å{layer}, total sparsity "
        f"{spars['total_sparsity']:.1%}, {result['s_per_epoch']:.1f} s/epoch, "
        f"{sum(result['compiles'].values())} compilation(s) -> {args.output}"
    )
    if valid.get("magmoms_mae") is not None:
        print(f"magnetic moments: valid MAE {valid['magmoms_mae']:.4f} μB")
    if "layer_sparsity" in spars and spars["layer_sparsity"] < REGIME_LAYER_SPARSITY:
        print(f"note: after {result['steps']} steps the STR thresholds have not risen to the paper's regime yet "
              f"(layer sparsity {spars['layer_sparsity']:.1%} < {REGIME_LAYER_SPARSITY:.0%}): train longer "
              f"(--epochs) or raise the score learning rate (--score-lr, now {config.score_lr})")


def _config_recorder(args: argparse.Namespace):
    """A callback (an `on_checkpoint` of finetune, or called bare after it) that writes
    RUN_DIR/config.yaml, every effective option but _NOT_RECORDED, once: at the run's first
    checkpoint, when RUN_DIR exists, so the file is there while the run goes on."""
    from sparse_eqv import distributed
    from sparse_eqv.config_file import write_config

    written = []

    def record(state=None, kind=None) -> None:
        if not written and distributed.is_primary():
            written.append(write_config(args.output / RUN_CONFIG_FILE, args, leave_out=_NOT_RECORDED))

    return record


def cmd_evaluate(args: argparse.Namespace) -> None:
    import json

    from tqdm import tqdm

    from sparse_eqv.atomic_write import atomic_file
    from sparse_eqv.finetune.evaluate import evaluate

    with tqdm(unit="frame", desc="evaluate", disable=args.quiet) as bar:
        evaluation = evaluate(args.model, args.data, max_atoms=args.batch_atoms, progress=bar,
                              read_options=_read_options(args))
    result = evaluation.metrics
    for name in ("raw", "e0_fit"):
        if name in result:
            m = result[name]
            print(
                f"{name:7s} E MAE {_fmt(m['energy_mae'])} RMSE {_fmt(m['energy_rmse'])} meV/atom | "
                f"F MAE {_fmt(m['forces_mae'])} RMSE {_fmt(m['forces_rmse'])} meV/Å | "
                f"S MAE {_fmt(m['stress_mae'])} RMSE {_fmt(m['stress_rmse'])} meV/Å^3 ({m['n_frames']} frames)"
            )
    if result["raw"].get("magmoms_mae") is not None:
        m = result["raw"]
        print(f"magmom  MAE {m['magmoms_mae']:.4f} RMSE {m['magmoms_rmse']:.4f} μB")
    if args.json is not None:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        from sparse_eqv.parity import SUMMARY_FILE, write_parity_plots

        figures = write_parity_plots(
            args.plot, evaluation.frames, evaluation.predictions, e0_shift_eV=result.get("e0_shift_eV"),
            title=f"{args.model.absolute().name} on {args.data.name}", data=args.data,
        )
        for figure in figures:
            print(f"figure: {figure}")
        print(f"wrote {args.plot / SUMMARY_FILE}")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _read_options(args: argparse.Namespace) -> dict[str, str]:
    return {"energy_key": args.energy_key, "forces_key": args.forces_key, "stress_key": args.stress_key,
            "magmoms_key": args.magmoms_key}


def _add_label_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--energy-key", default="energy", help="extxyz info key of the energy label")
    p.add_argument("--forces-key", default="forces", help="extxyz array key of the forces label")
    p.add_argument("--stress-key", default="stress", help="extxyz info key of the stress label")
    p.add_argument("--magmoms-key", default="magmoms",
                   help="extxyz per-atom array of magnetic moments, μB (e.g. initial_magmoms)")


def cmd_export(args: argparse.Namespace) -> None:
    from weights_convert.export import export_run

    summary = export_run(args.run, args.output, delta_only=args.delta_only, overwrite=args.overwrite)
    what = "sparse delta patch" if args.delta_only else "merged checkpoint"
    print(
        f"wrote {what} {summary['output']}: {summary['nnz']} changed numbers in {summary['tensors']} tensors, "
        f"{summary['bytes']:,} bytes (base checkpoint {summary['base_bytes']:,} bytes)"
    )
    if summary["magmom_head"] is not None:
        print(f"the magnetic-moment head is in {summary['magmom_head']} (torch checkpoints have none; "
              f"`sparse-eqv convert CHECKPOINT --magmom-head {summary['magmom_head']}` reattaches it)")


def cmd_apply_delta(args: argparse.Namespace) -> None:
    from weights_convert.export import apply_delta

    summary = apply_delta(args.base, args.patch, args.output, overwrite=args.overwrite)
    print(f"wrote {summary['output']}: {summary['nnz']} numbers changed in {summary['tensors']} tensors")
    if summary["magmom_head"] is not None:
        print(f"the patch's magnetic-moment head is not in the torch checkpoint; reattach it with "
              f"`sparse-eqv convert {summary['output']} --magmom-head {summary['magmom_head']}`")


def cmd_report(args: argparse.Namespace) -> None:
    from sparse_eqv.report import write_report

    output = args.output if args.output is not None else args.run / "report"
    figures = write_report(args.run, output)
    print((output / "report.txt").read_text(), end="")
    print(f"\nwrote {output / 'report.json'}, {output / 'report.txt'}")
    for figure in figures:
        print(f"figure: {figure}")


def cmd_robustness(args: argparse.Namespace) -> None:
    import json

    from sparse_eqv.atomic_write import atomic_file
    from sparse_eqv.robustness import format_result, robustness

    result = robustness(args.run, args.data, out_dir=args.output, md_steps=args.md_steps, md_frames=args.md_frames,
                        temperature=args.temperature, read_options=_read_options(args),
                        progress=(lambda message: None) if args.quiet else (lambda message: print(message, flush=True)))
    print(format_result(result), end="")
    for figure in result["figures"]:
        print(f"figure: {figure}")
    if args.json is not None:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


def cmd_curves(args: argparse.Namespace) -> None:
    from sparse_eqv.curves import write_curves

    path = write_curves(args.runs, args.output, labels=args.labels, title=args.title)
    print(f"wrote {path}: learning curves of {len(args.runs)} run(s) against the optimiser step")


def cmd_demo(args: argparse.Namespace) -> None:
    from sparse_eqv.demo.run import run_demo

    run_demo(args.output, data=args.data, model=args.model, minutes=args.minutes, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    from sparse_eqv.config_file import accept_config

    parser = argparse.ArgumentParser(prog="sparse-eqv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="torch checkpoint (MACE .model, nequip .ckpt/.nequip.zip, SevenNet .pth) -> Flax model dir")
    p.add_argument("checkpoint", help="checkpoint file, or a model name: a MACE foundation model such as "
                   "mace-mp-0b3-medium (downloaded once, cached) or a bundled SevenNet name such as 7net-0; "
                   "an unknown name lists the known ones")
    p.add_argument("-o", "--output", required=True, type=Path, help="model directory to write")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--head", default=None, help="head of a multi-head model (default: the only one)")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="accept globals outside the allowlist (pickles can run code; see README, 'Security')",
    )
    p.add_argument("--magmom-head", type=Path, default=None,
                   help="attach the magnetic-moment head of an exported patch or OUTPUT.magmom file")
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

    p = sub.add_parser("finetune", help="fine-tune a model: STR sparse deltas, full, ELoRA or from scratch")
    p.add_argument("model", type=Path, help="model directory (from convert)")
    p.add_argument("--train", required=True, type=Path, help="training data (extxyz, rMD17 .npz, DeePMD dir, mlearn .json)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--valid", type=Path, help="validation data")
    group.add_argument("--valid-fraction", type=float, default=0.1, help="else split this fraction off --train (seeded)")
    p.add_argument("--test", type=Path, help="test data, evaluated with the best epoch's params")
    p.add_argument("--method", choices=("str", "full", "elora", "scratch"), default="str")
    p.add_argument("--targets", nargs="+", default=["default"],
                   help="default (linear layers + tensor products with internal weights), all (adds symmetric "
                        "contractions and radial MLPs), a role, or leaf-path patterns")
    p.add_argument("--threshold-decay", default="0.05",
                   help="STR: weight decay lambda_tau on the scores; a comma-separated list (0.01,0.05,0.3) trains "
                        "one variant per value in one jitted run, RUN_DIR/lambda_<value>/ each")
    p.add_argument("--per-path", action="store_true", help="STR: one threshold per e3nn path instead of per layer")
    p.add_argument("--delta-std", type=float, default=0.01, help="STR: std of the initial delta")
    p.add_argument("--init-threshold", type=float, default=1e-3, help="STR: sigmoid(score) at the start")
    p.add_argument("--score-lr", type=float, default=None, help="STR: learning rate of the scores (default 0.05)")
    p.add_argument("--rank", type=int, default=16, help="ELoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="ELoRA scale alpha (delta = alpha/r A B)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="frames per step, over all devices")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-2 for STR's deltas, 1e-3 for the other methods)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of dense params (full, scratch)")
    p.add_argument("--clip-norm", type=float, default=10.0, help="global gradient-norm clip")
    p.add_argument("--schedule", choices=("plateau", "cosine", "constant"), default="plateau")
    p.add_argument("--patience", type=int, default=None, help="early stopping after N epochs without improvement")
    p.add_argument("--ema-decay", type=float, default=None, help="exponential moving average of the weights")
    p.add_argument("--energy-weight", type=float, default=1.0)
    p.add_argument("--forces-weight", type=float, default=100.0)
    p.add_argument("--stress-weight", type=float, default=1.0)
    p.add_argument("--huber-delta", type=float, default=None, help="Huber loss with this delta instead of squares")
    p.add_argument("--magmom", choices=("scalar", "vector"), default=None,
                   help="also train a per-atom magnetic-moment head (dense) on the data's moments: scalar |m| "
                        "(invariant) or vector m (equivariant); DeePMD spin.npy, extxyz --magmoms-key")
    p.add_argument("--magmom-weight", type=float, default=1.0, help="loss weight of the moments (per μB^2)")
    p.add_argument("--dense-lr", type=float, default=None,
                   help="learning rate of densely trained leaves, e.g. the --magmom head (default --lr)")
    p.add_argument("--replay", type=Path, default=None,
                   help="replay frames (any format; structures alone will do) whose loss is added at every step, "
                        "to keep what the base model knew outside the training data")
    p.add_argument("--replay-weight", type=float, default=1.0, help="weight of the replay batch's loss")
    p.add_argument("--replay-labels", choices=("base", "file"), default="base",
                   help="label replay frames with the base model's predictions (pseudolabels, cached in RUN_DIR) or "
                        "use the file's own labels")
    p.add_argument("--e0s", choices=("refit", "fit", "keep"), default="refit",
                   help="per-element reference energies: fit them on the training set before training and again "
                        "on the best model (refit), before only (fit), or keep the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="instead of --seed: a comma-separated list (0,1,2) trains one variant per seed (split, "
                        "order, init) in one jitted run, RUN_DIR/seed_<value>/ each; with several --threshold-decay "
                        "values, every pair")
    p.add_argument("--devices", type=int, default=None, help="local devices for data parallelism (default: all)")
    p.add_argument("--distributed", action="store_true",
                   help="several hosts: join a jax.distributed job (coordinator, process count and id from the "
                        "flags below or, without them, from the cluster environment, e.g. SLURM); every process "
                        "runs the same command and RUN_DIR must be on a shared file system")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="jax.distributed coordinator address")
    p.add_argument("--num-processes", type=int, default=None, help="processes in the jax.distributed job")
    p.add_argument("--process-id", type=int, default=None, help="this process's index in the job (0 writes RUN_DIR)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("-o", "--output", required=True, type=Path, help="run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in the output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each epoch's log row as TensorBoard scalars to RUN_DIR/tensorboard (needs tensorboardX)")
    _add_label_keys(p)
    accept_config(p)  # last: --config FILE.yaml may give every option above
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="MAE/RMSE of energy, forces, stress (raw and after an E0 fit)")
    p.add_argument("model", type=Path, help="model directory or fine-tuning run directory")
    p.add_argument("--data", required=True, type=Path, help="labelled data")
    p.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="write parity plots with error histograms here (parity_energy.png, parity_forces.png, "
                        "parity_stress.png: the quantities the data labels) and their numbers (parity.json)")
    p.add_argument("--batch-atoms", type=int, default=1024, help="atoms per batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_label_keys(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="fine-tuned run -> checkpoint of the base's format, or a sparse delta patch")
    p.add_argument("run", type=Path, help="run directory (from finetune)")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint (or, with --delta-only, patch) to write")
    p.add_argument("--delta-only", action="store_true", help="write only the changed numbers (see README, 'Delta patches')")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("apply-delta", help="base checkpoint + delta patch -> merged checkpoint")
    p.add_argument("base", type=Path, help="the base checkpoint the patch was made for")
    p.add_argument("patch", type=Path, help="patch from `export --delta-only`")
    p.add_argument("-o", "--output", required=True, type=Path, help="checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_apply_delta)

    p = sub.add_parser("report", help="sparsity of a run's deltas per layer, e3nn path, output l and element (tables, PNGs)")
    p.add_argument("run", type=Path, help="run directory (from finetune)")
    p.add_argument("-o", "--output", type=Path, default=None, help="directory for report.json/.txt and PNGs (default RUN/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("robustness", help="what fine-tuning changed outside its data: errors and drift on other sets, "
                                          "dimer curves, MD stability, base vs fine-tuned")
    p.add_argument("run", type=Path, help="run directory (from finetune); its base model is read from run.json")
    p.add_argument("--data", nargs="+", required=True, type=Path,
                   help="data files (labels optional: without them only the drift from the base is reported)")
    p.add_argument("-o", "--output", type=Path, default=None, help="directory for the figures (default RUN/robustness)")
    p.add_argument("--json", type=Path, default=None, help="write every number (curves included) as JSON here")
    p.add_argument("--md-steps", type=int, default=0, help="Langevin steps (1 fs) from the first frames of each file")
    p.add_argument("--md-frames", type=int, default=2, help="frames of each file to start MD from")
    p.add_argument("--temperature", type=float, default=300.0, help="MD temperature, K")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_label_keys(p)
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser("curves", help="learning curves of runs (training loss, validation MAE, layer sparsity vs step) as a PNG")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (each with a log.csv)")
    p.add_argument("-o", "--output", required=True, type=Path, help="PNG file to write")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: directory names)")
    p.add_argument("--title", default=None, help="figure title")
    p.set_defaults(func=cmd_curves)

    p = sub.add_parser("demo", help="convert SevenNet-0, fine-tune with STR on EMT Cu/Ni data, export, report")
    p.add_argument("-o", "--output", type=Path, default=Path("demo_out"), help="where everything is written")
    p.add_argument("--data", type=Path, default=None, help="your own labelled data instead of the EMT set")
    p.add_argument("--model", default="7net-0", help="base checkpoint (default: the bundled SevenNet-0)")
    p.add_argument("--minutes", type=float, default=3.0,
                   help="fine-tuning wall-time budget, compilation included (the whole demo takes a few minutes more)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
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
