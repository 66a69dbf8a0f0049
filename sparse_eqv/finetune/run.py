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

Variants (`--threshold-decay 0.01,0.05,0.3` and/or `--seeds 0,1,2`, trained by
one jitted step, see `loop`):

    RUN_DIR/variants.json        the variants, their directories and options (written first)
    RUN_DIR/checkpoints/last/    training state of all variants (resume from here)
    RUN_DIR/summary.json         final: per-variant results, the shared wall time
    RUN_DIR/<variant>/           an ordinary run directory (run.json, log.csv, model/,
                                 delta/, sparsity.json, metrics.json, checkpoints/best/)
                                 that evaluate and export read unchanged; it has no
                                 checkpoints/last: a variant resumes with the others

Variant directories are named `lambda_<value>` and/or `seed_<value>` after
what varies. Wall times in a variant's log and metrics are those of the
shared run.

Every input is read and checked (elements, shapes, NaN) and the E0s are fitted
before RUN_DIR is created, so bad input never leaves a half-written run; every
file inside is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
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
from sparse_eqv.finetune import tensorboard as tensorboard_lib
from sparse_eqv.finetune.dense import Full
from sparse_eqv.finetune.lora import ELoRA
from sparse_eqv.finetune.loop import Trainer, TrainConfig, Variant, make_graphs
from sparse_eqv.finetune.state import TrainState, save_state
from sparse_eqv.finetune.str import DELTA_LR, STR
from sparse_eqv.finetune.targets import describe, leaf_path, select_targets
from sparse_eqv.models import build_model

METHODS = ("str", "full", "elora", "scratch")
# --e0s: fit the per-element E0 shift on the training frames before training, then ("refit") once more
# on the best epoch's model (the force-weighted loss lets the energy drift by a per-element offset), or keep.
E0_MODES = ("refit", "fit", "keep")
VARIANTS_FILE = "variants.json"
SUMMARY_FILE = "summary.json"


def default_lr(method: str) -> float:
    """The peak learning rate a method gets unless told otherwise: STR's deltas
    `str.DELTA_LR`, every other method TrainConfig's (1e-3)."""
    return DELTA_LR if method == "str" else TrainConfig.lr
def parse_values(text: str, option: str, kind: type) -> list:
    """A comma-separated list of numbers from the CLI ("0.01,0.05,0.3").

    Args:
        kind: float (finite, >= 0: a decay) or int (>= 0: a seed).

    Raises:
        SparseEqvError naming the option and the bad item.
    """
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = kind(item)
        except ValueError:
            noun = "a number" if kind is float else "an integer"
            raise SparseEqvError(f"{option} {text!r}: {item!r} is not {noun} (give one value or a comma-separated list)") from None
        if not math.isfinite(value) or value < 0:
            raise SparseEqvError(f"{option} {text!r}: {item!r} must be finite and >= 0")
        values.append(value)
    if len(set(values)) != len(values):
        raise SparseEqvError(f"{option} {text!r}: a value is repeated")
    return values


def make_variants(decays: Sequence[float], seeds: Sequence[int]) -> list[Variant]:
    """Every (lambda_tau, seed) pair, lambda_tau-major."""
    return [Variant(float(d), int(s)) for d, s in itertools.product(decays, seeds)]


def variant_names(variants: Sequence[Variant]) -> list[str]:
    """Directory names: `lambda_<value>` and/or `seed_<value>`, after what varies."""
    by_seed = len({v.seed for v in variants}) > 1
    by_decay = len({v.threshold_decay for v in variants}) > 1 or not by_seed
    return [
        "_".join(([f"lambda_{v.threshold_decay!r}"] if by_decay else []) + ([f"seed_{v.seed}"] if by_seed else []))
        for v in variants
    ]


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
    if e0s not in E0_MODES:
        raise SparseEqvError(f"--e0s {e0s!r}; known: {', '.join(E0_MODES)}")
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
    of the model with `params` and the base constants on the training (graphs,
    frames), and `variables` with the shifted constants."""
    trainer.set_constants([variables["constants"]] * len(trainer.variants))
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
                 started: float, k: int = 0) -> dict[str, Any]:
    """metrics.json's content: the best epoch's model (directory/model) of the
    trainer's run k evaluated on the validation and test (graphs, frames) with
    its constants (test: None without frames), its sparsity
    (directory/sparsity.json), the run's counters, wall times (s) since
    `started` (perf_counter) and compilations."""
    _, best = load_model(directory / "model")
    return {
        "method": method,
        "epochs": run.epoch,
        "steps": run.step,
        "best_epoch": run.best_epoch + 1,
        "early_stopped": run.stopped,
        "valid": trainer.evaluate(best["params"], *valid, k=k),
        "test": trainer.evaluate(best["params"], *test, k=k) if test[1] else None,
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
    variants: Sequence[Variant] | None = None,
    e0s: str = "refit",
    overwrite: bool = False,
    resume: bool = False,
    n_devices: int | None = None,
    read_options: dict[str, str] | None = None,
    progress: bool = True,
    on_checkpoint=None,
    magmom: str | None = None,
    replay: str | Path | None = None,
    replay_labels: str = "base",
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Fine-tune the model in `model_dir` and write `run_dir`.

    Args:
        variants: None: one run (config.threshold_decay, config.seed), an
            ordinary run directory; returns metrics.json's content. Else the
            (lambda_tau, seed) pairs trained together, RUN_DIR/<variant>/ each
            (what `finetune` with that pair would write, but checkpoints/last,
            which is shared); returns summary.json's content.
        e0s: "refit" (least-squares E0 shift on the training frames before
            training and again on the best epoch's model), "fit" (before only) or "keep".
        resume: continue the run in `run_dir` from its last checkpoint.
        on_checkpoint: called with (state, kind) after each checkpoint is written.
        magmom: "scalar" or "vector": train a magnetic-moment head densely
            on the frames' moments (`sparse_eqv.finetune.magmom`); one run only.
        replay: frames whose loss (weight `config.replay_weight`) is added at
            every step, labelled by the base model or, with replay_labels
            "file", by their own labels (`sparse_eqv.finetune.replay`).
        tensorboard: also write each epoch's log row as TensorBoard scalars
            (RUN_DIR/<variant>/tensorboard, `sparse_eqv.finetune.tensorboard`).
    """
    started = time.perf_counter()
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    read_options = read_options or {}
    layout_variants = variants is not None
    variants = list(variants) if layout_variants else [Variant(config.threshold_decay, config.seed)]
    names = variant_names(variants) if layout_variants else [""]
    check_variants(variants, method, magmom=magmom, replay=replay)
    check_run_options(run_dir, e0s, overwrite, resume)
    if tensorboard:
        tensorboard_lib.require()

    model_config, variables, dtype = load_base(model_dir)
    numbers, cutoff = model_config["atomic_numbers"], float(model_config["r_max"])
    all_train, valid_frames, test_frames = read_inputs(train, valid, test, read_options)
    test_graphs = make_graphs(test_frames, numbers, cutoff) if test_frames else []
    splits: dict[int | None, tuple] = {}  # by the seed that split --train (None: --valid given)
    for v in variants:
        key = None if valid is not None else v.seed
        if key not in splits:
            tr, va = (all_train, valid_frames) if key is None else split_frames(all_train, valid_fraction, v.seed, Path(train))
            tr_graphs, va_graphs = make_graphs(tr, numbers, cutoff), make_graphs(va, numbers, cutoff)
            if magmom is not None:
                magmom_lib.require_labels(tr, train)
                tr_graphs, va_graphs = magmom_lib.label_graphs(tr_graphs, tr, magmom), magmom_lib.label_graphs(va_graphs, va, magmom)
            splits[key] = ((tr_graphs, tr), (va_graphs, va))
    data = [splits[None if valid is not None else v.seed] for v in variants]
    if magmom is not None:
        test_graphs = magmom_lib.label_graphs(test_graphs, test_frames, magmom)
    replay_frames, replay_graphs = [], []
    if replay is not None:
        replay_frames = read_frames(Path(replay), **read_options)
        replay_lib.check_labels(replay_frames, replay_labels, Path(replay))
        replay_graphs = make_graphs(replay_frames, numbers, cutoff)  # DataError on an element the model lacks

    module = build_model(model_config)
    bases: dict[int | None, Any] = {}
    for k, v in enumerate(variants):
        key = v.seed if method.method == "scratch" else None
        if key not in bases:
            bases[key] = variables["params"]
            if key is not None:
                (train_graphs, _), _ = data[k]
                bases[key] = scratch_params(module, train_graphs[0], v.seed, dtype, variables["params"], model_dir)
    base_params = [bases[v.seed if method.method == "scratch" else None] for v in variants]
    start_params = base_params
    if magmom is not None:
        model_config, module, backbone, head_params = magmom_lib.prepare(model_config, base_params[0], magmom,
                                                                         config.seed, dtype)
        base_params, start_params = [backbone], [{**backbone, magmom_lib.HEAD_KEY: head_params}]
    fine_method = make_method(method, base_params[0], model_config)
    trained_method = fine_method if magmom is None else magmom_lib.WithMagmomHead(fine_method, head_params)
    trainer = Trainer(module, variables["constants"], trained_method, base_params, config, variants,
                      n_devices=n_devices, dtype=jnp.dtype(dtype), cutoff=cutoff)
    trainer.fit_budgets(*[graphs for pairs in splits.values() for graphs, _ in pairs], test_graphs, replay_graphs)

    fits: dict[tuple, tuple] = {}  # by (split seed, scratch seed)
    fit_key = lambda v: (None if valid is not None else v.seed, v.seed if method.method == "scratch" else None)  # noqa: E731
    for k, v in enumerate(variants):
        if fit_key(v) not in fits:
            shift, shifted = np.zeros(len(numbers)), variables
            if e0s != "keep":
                (graphs, frames), _ = data[k]
                shift, shifted = fit_e0s(trainer, start_params[k], graphs, frames, model_config, variables)
            fits[fit_key(v)] = (shift, shifted["constants"])
    e0 = [fits[fit_key(v)] for v in variants]
    trainer.set_constants([constants for _, constants in e0])

    infos = []
    for k, cfg in enumerate(trainer.configs):
        (_, train_frames), (_, variant_valid) = data[k]
        info = run_info(
            model_dir, model_config, method, fine_method, cfg, e0s=e0s, e0_shift=e0[k][0], train=train, valid=valid,
            valid_fraction=valid_fraction, test=test,
            n_frames={"train": len(train_frames), "valid": len(variant_valid), "test": len(test_frames)},
            elements=training_elements(train_frames), n_devices=trainer.n_devices, magmom=magmom,
        )
        if replay is not None:
            info["replay"] = {"file": str(replay), "labels": replay_labels, "weight": config.replay_weight,
                              "n_frames": len(replay_frames)}
        infos.append({**info, "variant_of": str(run_dir.absolute())} if layout_variants else info)
    dirs = [run_dir / name for name in names]  # an ordinary run: RUN_DIR itself
    overview = {
        "variants": [{"name": n, "threshold_decay": v.threshold_decay, "seed": v.seed} for n, v in zip(names, variants)],
        "shared_batches": trainer.shared_batches,
        "options": {"method": dataclasses.asdict(method), "train": dataclasses.asdict(config), "e0s": e0s},
    }
    if resume:
        if layout_variants and json.loads((run_dir / VARIANTS_FILE).read_text())["variants"] != overview["variants"]:
            raise SparseEqvError(f"{run_dir}: --resume with other variants than the run was started with")
        for directory, info in zip(dirs, infos):
            check_resume(run_dir, directory / "run.json", info)
        state = trainer.restore(run_dir / "checkpoints" / "last")
    else:
        distributed.barrier("run directory checked")  # before process 0 creates it
        if distributed.is_primary():
            with atomic_directory(run_dir, overwrite=overwrite) as tmp:
                if layout_variants:
                    (tmp / VARIANTS_FILE).write_text(json.dumps(overview, indent=1))
                for name, info in zip(names, infos):
                    (tmp / name).mkdir(exist_ok=True)
                    (tmp / name / "run.json").write_text(json.dumps(info, indent=1))
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
    def save(state, kind: str) -> None:
        if distributed.is_primary():
            trainer.save(run_dir / "checkpoints" / kind, state)
        if on_checkpoint is not None:
            on_checkpoint(state, kind)

    def on_best(k: int, run: TrainState, params: Any, metrics: dict) -> None:
        if distributed.is_primary():
            tree = run.ema if run.ema is not None else run.tree
            write_best(dirs[k], model_config, e0[k][1], base_params[k], fine_method, tree, params)
            save_state(dirs[k] / "checkpoints" / "best", run)

    writers = [tensorboard_lib.open_writer(d) for d in dirs] if tensorboard and distributed.is_primary() else None

    def on_epoch(k: int, run: TrainState) -> None:
        if distributed.is_primary():
            _write_csv(dirs[k] / "log.csv", run.history)
            write_train_log(dirs[k], run.history, config.epochs)
            if writers is not None:
                tensorboard_lib.write_row(writers[k], run.history[-1])

    state = trainer.fit(state, [pair for pair, _ in data], [pair for _, pair in data], save=save, on_best=on_best,
                        on_epoch=on_epoch, progress=progress, replay=replay_set, names=names)
    for writer in writers or ():
        writer.close()

    distributed.barrier("best model written")
    if e0s == "refit":
        constants = [refit_e0s(trainer, k, dirs[k], data[k][0], e0[k]) for k in range(len(variants))]
        trainer.set_constants(constants)
        distributed.barrier("E0s refitted")
    results = {}
    for k, (directory, run) in enumerate(zip(dirs, state.runs)):
        result = best_metrics(directory, method.method, run, trainer, data[k][1], (test_graphs, test_frames), started, k)
        if distributed.is_primary():
            _write_json(directory / "metrics.json", result)
        results[names[k]] = {"threshold_decay": variants[k].threshold_decay, "seed": variants[k].seed, **result}
    if not layout_variants:
        return result
    summary = {
        "variants": results,
        "shared_batches": trainer.shared_batches,
        "train_wall_s": max(run.wall for run in state.runs),
        "compiles": dict(trainer.compiles),
        "session_wall_s": time.perf_counter() - started,
    }
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def refit_e0s(trainer: Trainer, k: int, run_dir: Path, train: tuple, e0: tuple[np.ndarray, Any]) -> Any:
    """--e0s refit: the least-squares E0 shift of run k's best model (run_dir/model) on its training
    (graphs, frames), added to the constants it trained with (`e0`: shift eV, constants); rewrites
    run_dir/model and records the second shift in run.json ("e0_refit_eV", eV per element; "e0_shift_eV"
    stays the first: the model's constants are the base's plus both).
    Returns the new constants. Idempotent: a resumed run that refits again writes the same."""
    model_config, best = load_model(run_dir / "model")
    predictions, _ = trainer.predict(best["params"], *train, k=k)
    graphs, frames = train
    shift = e0s_lib.fit_e0_shift(frames, [p["energy"] for p in predictions], model_config["atomic_numbers"])
    constants = e0s_lib.shift_e0s(model_config, {"constants": e0[1]}, shift)["constants"]
    if distributed.is_primary():
        save_model(run_dir / "model", model_config, {"params": best["params"], "constants": constants}, overwrite=True)
        info = json.loads((run_dir / "run.json").read_text())
        info["e0_refit_eV"] = {str(z): float(s) for z, s in zip(model_config["atomic_numbers"], shift)}
        _write_json(run_dir / "run.json", info)
    return constants


def check_variants(variants: Sequence[Variant], method: MethodOptions, *, magmom: str | None,
                   replay: str | Path | None) -> None:
    """SparseEqvError for a variant list this run cannot train: repeated pairs,
    several lambda_tau without STR, several variants with --magmom or across
    processes, --replay with several seeds (its pseudolabels carry one E0 fit)."""
    if not variants or len(set(variants)) != len(variants):
        raise SparseEqvError(f"{len(variants)} variant(s), {len(set(variants))} distinct: give distinct values")
    if method.method != "str" and len({v.threshold_decay for v in variants}) > 1:
        raise SparseEqvError(f"several --threshold-decay values need --method str (not {method.method})")
    if len(variants) > 1 and magmom is not None:
        raise SparseEqvError("--magmom is not supported with several variants (--threshold-decay / --seeds lists)")
    if len(variants) > 1 and jax.process_count() > 1:
        raise SparseEqvError("several variants run in one process (no --distributed): use one value per run")
    if replay is not None and magmom is not None:
        raise SparseEqvError("--replay and --magmom cannot be combined yet")
    if replay is not None and len({v.seed for v in variants}) > 1:
        raise SparseEqvError("--replay with a --seeds list: the replay pseudolabels are fitted to one seed's E0s; "
                             "run one seed at a time")


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


def summary_table(summary: dict[str, Any]) -> str:
    """summary.json's variants as a text table (validation metrics of each best epoch)."""
    rows = [("variant", "best epoch", "E MAE meV/atom", "F MAE meV/Å", "layer sparsity", "total sparsity")]
    for name, result in summary["variants"].items():
        valid, spars = result["valid"], result["sparsity"]
        rows.append((
            name, f"{result['best_epoch']}/{result['epochs']}",
            "n/a" if valid["energy_mae"] is None else f"{valid['energy_mae']:.3f}",
            "n/a" if valid["forces_mae"] is None else f"{valid['forces_mae']:.3f}",
            f"{spars['layer_sparsity']:.1%}" if "layer_sparsity" in spars else "-",
            f"{spars['total_sparsity']:.1%}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
