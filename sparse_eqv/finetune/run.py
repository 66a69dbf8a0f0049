"""A fine-tuning run as the CLI drives it: data in, run directory out.

Run directory:

    RUN_DIR/run.json            options, data files and frame counts, targets,
                                fitted E0 shift, base model (written first)
    RUN_DIR/log.csv             one row per epoch (loss, lr, validation MAE/RMSE,
                                layer sparsity, STR thresholds min/median/max,
                                wall time, compilations)
    RUN_DIR/train.log           the same, one readable line per epoch (follow it with `tail -F`)
    RUN_DIR/model/              a model directory (config.json + variables/) with
                                the best epoch's effective params merged into the
                                base and the E0-shifted constants: `predict`,
                                `evaluate`, `export` read it like a converted model
                                (with --magmom: config "magmom" and the moment
                                head's params, params/magmom_head)
    RUN_DIR/delta/              STR only: the thresholded delta of the targeted
                                leaves (orbax), the sparse patch export applies
    RUN_DIR/sparsity.json       best epoch: layer / total sparsity, per-layer and
                                per-path views, thresholds
    RUN_DIR/checkpoints/last/   full training state (resume from here)
    RUN_DIR/checkpoints/best/   full training state of the best epoch
    RUN_DIR/replay_labels.npz   with --replay: the replay frames' labels (base
                                model's pseudolabels or the file's own), float64
    RUN_DIR/metrics.json        final: best-epoch validation and test metrics,
                                sparsity, wall time, s/epoch, compilations

Every input is read and checked (elements, shapes, NaN) and the E0s are fitted
before RUN_DIR is created, so bad input never leaves a half-written run; every
file inside is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparse_eqv import distributed, sparsity
from sparse_eqv.atomic_write import atomic_directory, atomic_file
from sparse_eqv.checkpoint import load_model, pytree_checkpointer, save_model
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.readers import read_frames
from sparse_eqv.errors import DataError, SparseEqvError
from sparse_eqv.finetune import e0s as e0s_lib
from sparse_eqv.finetune import magmom as magmom_lib
from sparse_eqv.finetune import replay as replay_lib
from sparse_eqv.finetune.dense import Full
from sparse_eqv.finetune.lora import ELoRA
from sparse_eqv.finetune.loop import Trainer, TrainConfig, TrainState, make_graphs, save_state
from sparse_eqv.finetune.str import DELTA_LR, STR
from sparse_eqv.finetune.targets import describe, leaf_path, select_targets
from sparse_eqv.models import build_model

METHODS = ("str", "full", "elora", "scratch")


def default_lr(method: str) -> float:
    """The peak learning rate a method gets unless told otherwise: STR's deltas
    `str.DELTA_LR`, every other method TrainConfig's (1e-3)."""
    return DELTA_LR if method == "str" else TrainConfig.lr
# Options that must agree between a run and its --resume.
_RESUME_KEYS = ("method", "targets", "per_path", "seed", "batch_size", "lr", "threshold_decay", "e0s", "data", "model",
                "magmom", "replay")


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Method choice and its hyper-parameters (CLI flags)."""

    method: str = "str"
    targets: tuple[str, ...] = ("default",)
    per_path: bool = False
    delta_std: float = 0.01
    init_threshold: float = 1e-3
    rank: int = 16
    alpha: float = 16.0


def make_method(options: MethodOptions, params: Any, config: dict[str, Any]):
    """The method object for `options` on a model with these params."""
    if options.method not in METHODS:
        raise SparseEqvError(f"--method {options.method!r}; known: {', '.join(METHODS)}")
    if options.method in ("full", "scratch"):
        return Full(name=options.method)
    targets = select_targets(params, config, list(options.targets))
    if options.method == "str":
        return STR(targets, per_path=options.per_path, delta_std=options.delta_std, init_threshold=options.init_threshold)
    return ELoRA(targets, rank=options.rank, alpha=options.alpha)


def fresh_params(module, graph, seed: int) -> Any:
    """A fresh initialisation of the architecture (for --method scratch)."""
    vectors = jnp.tile(jnp.asarray([[0.0, 0.0, 1.0]], jnp.float64), (graph.senders.shape[0], 1))
    variables = module.init(jax.random.PRNGKey(seed), vectors, jnp.asarray(graph.nodes["species"]),
                            jnp.asarray(graph.senders), jnp.asarray(graph.receivers))
    return variables["params"]


def split_frames(frames: list[Frame], fraction: float, seed: int, path: Path) -> tuple[list[Frame], list[Frame]]:
    """Seeded random split into (train, valid) with round(fraction * n) >= 1 validation frames."""
    if not 0.0 < fraction < 1.0:
        raise SparseEqvError(f"--valid-fraction {fraction}: must lie strictly between 0 and 1")
    n_valid = max(1, int(round(fraction * len(frames))))
    if n_valid >= len(frames):
        raise DataError(f"{path}: {len(frames)} frame(s) cannot be split into training and validation sets")
    order = np.random.default_rng(seed).permutation(len(frames))
    return [frames[i] for i in sorted(order[n_valid:])], [frames[i] for i in sorted(order[:n_valid])]


def _cast(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: np.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x), tree)


def check_run_options(run_dir: Path, e0s: str, overwrite: bool, resume: bool) -> None:
    """The checks made before anything is read: a known --e0s, and RUN_DIR new
    (or --overwrite), or resumable with --resume. Raises SparseEqvError."""
    if e0s not in ("fit", "keep"):
        raise SparseEqvError(f"--e0s {e0s!r}; known: fit, keep")
    if run_dir.exists() and not (overwrite or resume):
        raise SparseEqvError(f"{run_dir}: already exists (pass --resume to continue it or --overwrite to replace it)")
    if resume and not (run_dir / "checkpoints" / "last").exists():
        raise SparseEqvError(f"{run_dir}: nothing to resume (no checkpoints/last)")


def load_base(model_dir: Path) -> tuple[dict[str, Any], Any, type]:
    """The model to fine-tune: (config, variables with floats cast to the
    config's dtype, that dtype: np.float64 or np.float32)."""
    model_config, variables = load_model(model_dir)
    dtype = np.float64 if model_config.get("dtype", "float64") == "float64" else np.float32
    return model_config, _cast(variables, dtype), dtype


def read_inputs(
    train: str | Path, valid: str | Path | None, test: str | Path | None, read_options: dict[str, str],
) -> tuple[list[Frame], list[Frame] | None, list[Frame]]:
    """The frames of --train, --valid (None when not given) and --test (empty
    when not given), each read and checked; DataError naming the energy keys
    --train has when none of its frames carries an energy."""
    train_frames = read_frames(Path(train), **read_options)
    if all(f.energy is None for f in train_frames):  # a wrong --energy-key: name the keys the file has
        read_frames(Path(train), **read_options, require_energy=True)
    valid_frames = read_frames(Path(valid), **read_options) if valid is not None else None
    test_frames = read_frames(Path(test), **read_options) if test is not None else []
    return train_frames, valid_frames, test_frames


def scratch_params(module, graph, seed: int, dtype, params: Any, model_dir: Path) -> Any:
    """`fresh_params` cast to `dtype` (--method scratch); SparseEqvError unless
    it has the tree of the model's `params`."""
    fresh = _cast(fresh_params(module, graph, seed), dtype)
    if jax.tree.structure(fresh) != jax.tree.structure(params):
        raise SparseEqvError(f"{model_dir}: a fresh initialisation does not reproduce the model's parameter tree")
    return fresh


def fit_e0s(trainer: Trainer, params: Any, graphs, frames: list[Frame], model_config: dict[str, Any],
            variables: Any) -> tuple[np.ndarray, Any]:
    """--e0s fit: the least-squares E0 shift (eV, one per element of the model)
    of the model with `params` on the training (graphs, frames), and
    `variables` with the shifted constants."""
    predictions, _ = trainer.predict(params, graphs, frames)
    shift = e0s_lib.fit_e0_shift(frames, [p["energy"] for p in predictions], model_config["atomic_numbers"])
    return shift, e0s_lib.shift_e0s(model_config, variables, shift)


def run_info(
    model_dir: Path,
    model_config: dict[str, Any],
    method: MethodOptions,
    fine_method,
    config: TrainConfig,
    *,
    e0s: str,
    e0_shift: np.ndarray,
    train: str | Path,
    valid: str | Path | None,
    valid_fraction: float,
    test: str | Path | None,
    n_frames: dict[str, int],
    elements: Sequence[int],
    n_devices: int,
    magmom: str | None,
) -> dict[str, Any]:
    """run.json's content: the run's options, data, frame counts ({"train",
    "valid", "test"}), the training data's elements (atomic numbers), targeted
    leaves and fitted E0 shift (eV per element)."""
    return {
        "model": str(model_dir.absolute()),
        "model_source": model_config.get("source"),
        "method": method.method,
        "targets": list(method.targets),
        "per_path": method.per_path,
        "targeted_leaves": describe(getattr(fine_method, "targets", ())),
        "seed": config.seed,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "threshold_decay": config.threshold_decay,
        "e0s": e0s,
        "e0_shift_eV": {str(z): float(s) for z, s in zip(model_config["atomic_numbers"], e0_shift)},
        "data": {"train": str(train), "valid": None if valid is None else str(valid),
                 "valid_fraction": None if valid is not None else valid_fraction,
                 "test": None if test is None else str(test)},
        "n_frames": n_frames,
        "elements": sorted(int(z) for z in elements),
        "options": {"method": dataclasses.asdict(method), "train": dataclasses.asdict(config)},
        "n_devices": n_devices,
        "magmom": model_config.get("magmom") if magmom is not None else None,
    }


def training_elements(frames: Sequence[Frame]) -> list[int]:
    """The atomic numbers present in `frames`, sorted."""
    return sorted({int(z) for frame in frames for z in frame.numbers})


def check_resume(run_dir: Path, run_json: Path, info: dict[str, Any]) -> None:
    """SparseEqvError when `info` differs from the run.json written when the run
    started (`run_json`) in an option a resumed run must keep (_RESUME_KEYS)."""
    previous = json.loads(run_json.read_text())
    changed = [k for k in _RESUME_KEYS if previous.get(k) != info.get(k)]
    if changed:
        raise SparseEqvError(f"{run_dir}: --resume with different {', '.join(changed)} than the run was started with")


def best_metrics(directory: Path, method: str, run: TrainState, trainer: Trainer, valid: tuple, test: tuple,
                 started: float) -> dict[str, Any]:
    """metrics.json's content: the best epoch's model (directory/model) evaluated
    on the validation and test (graphs, frames) with the trainer's constants
    (test: None without frames), its sparsity (directory/sparsity.json), the
    run's counters, wall times (s) since `started` (perf_counter) and compilations."""
    _, best = load_model(directory / "model")
    return {
        "method": method,
        "epochs": run.epoch,
        "steps": run.step,
        "best_epoch": run.best_epoch + 1,
        "early_stopped": run.stopped,
        "valid": trainer.evaluate(best["params"], *valid),
        "test": trainer.evaluate(best["params"], *test) if test[1] else None,
        "sparsity": json.loads((directory / "sparsity.json").read_text())["summary"],
        "train_wall_s": run.wall,
        "s_per_epoch": float(np.median([row["epoch_s"] for row in run.history])) if run.history else None,
        "compiles": dict(trainer.compiles),
        "n_budgets": len(trainer.budgets),
        "n_devices": trainer.n_devices,
        "session_wall_s": time.perf_counter() - started,
    }


def _write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=float))


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as tmp:
        tmp.write_text(buffer.getvalue())


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """One line of RUN_DIR/train.log from a log.csv row (losses, validation
    MAE in meV/atom and meV/Å, STR sparsity and thresholds, lr, s/epoch)."""
    parts = [f"epoch {row['epoch']}/{epochs} step {row['step']}",
             f"train loss {row['train_loss']:.4g} valid loss {row['valid_loss']:.4g}",
             f"valid E MAE {_num(row.get('valid_energy_mae'))} meV/atom F MAE {_num(row.get('valid_forces_mae'))} meV/Å"]
    if "layer_sparsity" in row:
        parts.append(f"layer sparsity {row['layer_sparsity']:.1%} thresholds {row['threshold_min']:.3g}.."
                     f"{row['threshold_max']:.3g} (median {row['threshold_median']:.3g})")
    parts.append(f"lr {row['lr']:.3g} {row['epoch_s']:.1f} s/epoch")
    return " | ".join(parts)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_train_log(run_dir: Path, history: Sequence[dict], epochs: int) -> None:
    """RUN_DIR/train.log: one `epoch_line` per finished epoch (rewritten whole, atomically,
    so a resumed run's log is the uninterrupted one's); follow it with `tail -F`."""
    with atomic_file(run_dir / "train.log") as tmp:
        tmp.write_text("".join(epoch_line(row, epochs) + "\n" for row in history))


def finetune(
    model_dir: str | Path,
    run_dir: str | Path,
    *,
    train: str | Path,
    valid: str | Path | None = None,
    valid_fraction: float = 0.1,
    test: str | Path | None = None,
    method: MethodOptions = MethodOptions(),
    config: TrainConfig = TrainConfig(),
    e0s: str = "fit",
    overwrite: bool = False,
    resume: bool = False,
    n_devices: int | None = None,
    read_options: dict[str, str] | None = None,
    progress: bool = True,
    on_checkpoint=None,
    magmom: str | None = None,
    replay: str | Path | None = None,
    replay_labels: str = "base",
) -> dict[str, Any]:
    """Fine-tune the model in `model_dir` and write `run_dir`; returns metrics.json's content.

    Args:
        e0s: "fit" (least-squares E0 shift on the training set) or "keep".
        resume: continue the run in `run_dir` from its last checkpoint.
        on_checkpoint: called with (state, kind) after each checkpoint is written.
        magmom: "scalar" or "vector": train a magnetic-moment head densely
            on the frames' moments (`sparse_eqv.finetune.magmom`).
        replay: frames whose loss (weight `config.replay_weight`) is added at
            every step, labelled by the base model or, with replay_labels
            "file", by their own labels (`sparse_eqv.finetune.replay`).
    """
    started = time.perf_counter()
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    read_options = read_options or {}
    check_run_options(run_dir, e0s, overwrite, resume)

    model_config, variables, dtype = load_base(model_dir)
    train_frames, valid_frames, test_frames = read_inputs(train, valid, test, read_options)
    if valid_frames is None:
        train_frames, valid_frames = split_frames(train_frames, valid_fraction, config.seed, Path(train))
    numbers, cutoff = model_config["atomic_numbers"], float(model_config["r_max"])
    train_graphs = make_graphs(train_frames, numbers, cutoff)
    valid_graphs = make_graphs(valid_frames, numbers, cutoff)
    test_graphs = make_graphs(test_frames, numbers, cutoff) if test_frames else []
    replay_frames, replay_graphs = [], []
    if replay is not None:
        if magmom is not None:
            raise SparseEqvError("--replay and --magmom cannot be combined yet")
        replay_frames = read_frames(Path(replay), **read_options)
        replay_lib.check_labels(replay_frames, replay_labels, Path(replay))
        replay_graphs = make_graphs(replay_frames, numbers, cutoff)  # DataError on an element the model lacks
    if magmom is not None:
        magmom_lib.require_labels(train_frames, train)
        train_graphs, valid_graphs, test_graphs = (
            magmom_lib.label_graphs(g, f, magmom)
            for g, f in ((train_graphs, train_frames), (valid_graphs, valid_frames), (test_graphs, test_frames))
        )

    module = build_model(model_config)
    base_params = variables["params"]
    if method.method == "scratch":
        base_params = scratch_params(module, train_graphs[0], config.seed, dtype, variables["params"], model_dir)
    start_params = base_params
    if magmom is not None:
        model_config, module, base_params, head_params = magmom_lib.prepare(model_config, base_params, magmom,
                                                                             config.seed, dtype)
        start_params = {**base_params, magmom_lib.HEAD_KEY: head_params}
    fine_method = make_method(method, base_params, model_config)
    trained_method = fine_method if magmom is None else magmom_lib.WithMagmomHead(fine_method, head_params)
    trainer = Trainer(module, variables["constants"], trained_method, base_params, config, n_devices=n_devices,
                      dtype=jnp.dtype(dtype), cutoff=cutoff)
    trainer.fit_budgets(train_graphs, valid_graphs, test_graphs, replay_graphs)

    e0_shift = np.zeros(len(numbers))
    if e0s == "fit":
        e0_shift, variables = fit_e0s(trainer, start_params, train_graphs, train_frames, model_config, variables)
        trainer.set_constants(variables["constants"])

    info = run_info(
        model_dir, model_config, method, fine_method, config, e0s=e0s, e0_shift=e0_shift, train=train, valid=valid,
        valid_fraction=valid_fraction, test=test,
        n_frames={"train": len(train_frames), "valid": len(valid_frames), "test": len(test_frames)},
        elements=training_elements(train_frames), n_devices=trainer.n_devices, magmom=magmom,
    )
    if replay is not None:
        info["replay"] = {"file": str(replay), "labels": replay_labels, "weight": config.replay_weight,
                          "n_frames": len(replay_frames)}
    if resume:
        check_resume(run_dir, run_dir / "run.json", info)
        state = trainer.restore(run_dir / "checkpoints" / "last")
    else:
        distributed.barrier("run directory checked")  # before process 0 creates it
        if distributed.is_primary():
            with atomic_directory(run_dir, overwrite=overwrite) as tmp:
                (tmp / "run.json").write_text(json.dumps(info, indent=1))
        state = trainer.initial_state()
    replay_set = None
    if replay is not None:
        if not resume and distributed.is_primary():
            labels = replay_lib.replay_labels(
                replay_frames, lambda frames: trainer.predict(variables["params"], replay_graphs, frames)[0],
                replay_labels, numbers, Path(replay))
            replay_lib.write_cache(run_dir, labels)
        distributed.barrier("replay labels written")
        replay_frames = replay_lib.read_cache(run_dir, replay_frames)
        replay_set = (make_graphs(replay_frames, numbers, cutoff), replay_frames)

    # Only process 0 writes (several hosts: see sparse_eqv.distributed).
    def save(state: TrainState, kind: str) -> None:
        if distributed.is_primary():
            save_state(run_dir / "checkpoints" / kind, state)
        if on_checkpoint is not None:
            on_checkpoint(state, kind)

    def on_best(state: TrainState, params: Any, metrics: dict) -> None:
        if distributed.is_primary():
            tree = jax.tree.map(np.asarray, state.ema if state.ema is not None else state.tree)
            write_best(run_dir, model_config, variables["constants"], base_params, fine_method, tree, params)

    def on_epoch(state: TrainState) -> None:
        if distributed.is_primary():
            _write_csv(run_dir / "log.csv", state.history)
            write_train_log(run_dir, state.history, config.epochs)

    state = trainer.fit(
        state, (train_graphs, train_frames), (valid_graphs, valid_frames),
        save=save, on_best=on_best, on_epoch=on_epoch, progress=progress, replay=replay_set,
    )

    distributed.barrier("best model written")
    result = best_metrics(run_dir, method.method, state, trainer, (valid_graphs, valid_frames),
                          (test_graphs, test_frames), started)
    if distributed.is_primary():
        _write_json(run_dir / "metrics.json", result)
    return result


def write_best(run_dir: Path, model_config, constants, base_params, method, tree, params) -> None:
    """Write model/, sparsity.json and (STR) delta/ for the best epoch's tree."""
    delta = sparsity.prune(method, tree) if isinstance(method, STR) else None
    if delta is not None:  # (params may hold a moment head beside the backbone: kept)
        params = {**params, **sparsity.merge(base_params, delta)}
    params = jax.tree.map(np.asarray, params)
    report = {"summary": {**sparsity.summary(base_params, params, delta), "method": method.name}}
    if delta is not None:
        report["layers"] = sparsity.layer_view(delta)
        report["paths"] = sparsity.path_view(delta)
        report["thresholds"] = {leaf_path(k): v for k, v in method.thresholds(tree).items()}
        with atomic_directory(run_dir / "delta", overwrite=True) as tmp:
            pytree_checkpointer().save((tmp / "delta").absolute(), traverse_util.unflatten_dict(delta))
            (tmp / "leaves.json").write_text(json.dumps(describe(delta), indent=1))
    config = {**model_config, "finetuned": {"run": str(run_dir.absolute()), "method": method.name}}
    save_model(run_dir / "model", config, {"params": params, "constants": constants}, overwrite=True)
    _write_json(run_dir / "sparsity.json", report)

