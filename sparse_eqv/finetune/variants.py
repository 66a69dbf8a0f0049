"""Several fine-tuning variants in one jitted run.

K variants of one run that differ in lambda_tau (`--threshold-decay
0.01,0.05,0.3`) and/or in the seed (`--seeds 0,1,2`) train together: the
trainable leaves (STR deltas and scores, or any method's non-frozen leaves),
their optimiser state and their EMA get a leading axis of size K, the frozen
base is stored and passed once, and one jitted step vmaps the ordinary
per-run step over K. lambda_tau enters the step as a per-variant argument of
the score AdamW's decoupled decay, so one compilation serves every variant.

Variant k is the run `finetune --threshold-decay lambda_k --seed seed_k` with
every other option shared: the same initial tree, training split, batches,
E0 fit, clipping, loss, schedule (plateau counters per variant), EMA, early
stopping (a stopped variant's arrays are held while the others go on) and
best-epoch choice, so its results equal that run's up to float round-off
(batched matmuls may sum in another order).

Variants with one seed share their batches: the model runs K times on one
padded batch, and whatever depends on the geometry alone (edge vectors,
spherical harmonics, radial bases) is computed once. Variants with different
seeds have their own split, batch order and E0 fit; their batches are padded
to a common budget and stacked on the variant axis.

Run directory:

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
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sparse_eqv.atomic_write import atomic_directory
from sparse_eqv.errors import CheckpointError, SparseEqvError
from sparse_eqv.finetune.loop import (
    STATE_FILE, Trainer, TrainConfig, TrainState, make_graphs, read_saved_arrays, save_state,
)
from sparse_eqv.finetune.run import (
    MethodOptions, _write_csv, _write_json, best_metrics, check_resume, check_run_options, fit_e0s, load_base,
    make_method, read_inputs, run_info, scratch_params, split_frames, training_elements, write_best,
    write_train_log,
)
from sparse_eqv.models import build_model

VARIANTS_FILE = "variants.json"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One member of a variant run: its lambda_tau and its seed."""

    threshold_decay: float
    seed: int


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


@dataclasses.dataclass
class VariantState:
    """The state of all variants; checkpointed whole.

    Attributes:
        shared: the frozen leaves of the trainable tree (one copy).
        own: the other leaves, each with a leading variant axis (K, ...).
        opt_state: optax state, every leaf with a leading variant axis.
        ema: moving average of `own` (K, ...), or None.
        runs: per variant, a TrainState holding its counters and log rows
            (its array fields are None except inside epoch callbacks).
    """

    shared: list
    own: list
    opt_state: Any
    ema: list | None
    runs: list[TrainState]

    def arrays(self) -> dict[str, Any]:
        return {"shared": self.shared, "own": self.own, "opt_state": self.opt_state, "ema": self.ema}

    def scalars(self) -> dict[str, Any]:
        return {"runs": [run.scalars() for run in self.runs]}

    def on_host(self) -> "VariantState":
        """A copy with numpy arrays (the same `runs`)."""
        return VariantState(*jax.tree.map(np.asarray, (self.shared, self.own, self.opt_state, self.ema)), runs=self.runs)


def restore_variant_state(directory: Path, template: VariantState) -> VariantState:
    """Read a state written by `save_state(directory, variant_state)`."""
    scalars = json.loads((directory / STATE_FILE).read_text())
    if scalars.get("n_leaves") != len(jax.tree.leaves(template.arrays())) or len(scalars.get("runs", ())) != len(
        template.runs
    ):
        raise CheckpointError(f"{directory}: checkpoint does not match this run's variants, method and model")
    runs = [TrainState(tree=None, opt_state=None, ema=None, **run) for run in scalars["runs"]]
    return VariantState(**read_saved_arrays(directory, template.arrays()), runs=runs)


class VariantTrainer(Trainer):
    """Trains K variants of one method on one model in one jitted step.

    Args:
        module, constants, method: as for Trainer (constants: the model's;
            per-variant E0-shifted ones come from `set_variant_constants`).
        base_params: one per variant (they differ only for a fresh
            initialisation, --method scratch, with several seeds).
        train_config: the shared options; threshold_decay and seed are each
            variant's.
        variants: the K variants.
        trainer_options: Trainer's keyword options (n_devices, dtype, cutoff).
    """

    def __init__(
        self,
        module,
        constants: Any,
        method,
        base_params: Sequence[Any],
        train_config: TrainConfig,
        variants: Sequence[Variant],
        **trainer_options,
    ):
        if not variants or len(base_params) != len(variants):
            raise ValueError(f"{len(variants)} variant(s) with {len(base_params)} base param set(s)")
        self.variants = tuple(variants)
        self.configs = [dataclasses.replace(train_config, threshold_decay=v.threshold_decay, seed=v.seed) for v in variants]
        super().__init__(module, constants, method, base_params[0], self.configs[0], **trainer_options)
        trees = [self.initial_tree] + [
            jax.tree.map(np.asarray, self._cast(method.init(p, jax.random.PRNGKey(c.seed))))
            for p, c in zip(base_params[1:], self.configs[1:])
        ]
        self._treedef = jax.tree.structure(trees[0])
        self._frozen = [label == "frozen" for label in jax.tree.leaves(self.labels)]
        leaves = [jax.tree.leaves(tree) for tree in trees]
        for i, frozen in enumerate(self._frozen):
            if frozen and any(not np.array_equal(other[i], leaves[0][i]) for other in leaves[1:]):
                raise ValueError(f"variants differ in frozen leaf {i}; only trainable leaves may differ")
        self.initial_shared = [x for x, frozen in zip(leaves[0], self._frozen) if frozen]
        self.initial_own = [np.stack([other[i] for other in leaves]) for i, frozen in enumerate(self._frozen) if not frozen]
        self.initial_opt = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[self.optimizer.init(t) for t in trees])
        self.decays = np.asarray([v.threshold_decay for v in variants], self.dtype)
        self.shared_batches = len({v.seed for v in variants}) == 1
        self.batch_sharding = self.sharded if self.shared_batches else NamedSharding(self.mesh, PartitionSpec(None, "data"))
        self.set_variant_constants([constants] * len(variants))
        self._train_variants = jax.jit(self._variants_step, static_argnames=("constants_axis", "batch_axis"),
                                       donate_argnums=(0, 1, 2))

    # -- state -------------------------------------------------------------

    def set_variant_constants(self, constants: Sequence[Any]) -> None:
        """Per-variant model constants (E0 fits); passed once when they agree."""
        self.variant_constants = [jax.tree.map(np.asarray, c) for c in constants]
        first = jax.tree.leaves(self.variant_constants[0])
        same = all(all(np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(c))) for c in self.variant_constants[1:])
        self.constants_axis = None if same else 0
        stacked = self.variant_constants[0] if same else jax.tree.map(lambda *xs: np.stack(xs), *self.variant_constants)
        self.stacked_constants = self._put(stacked)
        self.set_constants(self.variant_constants[0])

    def initial_variant_state(self) -> VariantState:
        own = self._put(self.initial_own)
        return VariantState(
            shared=self._put(self.initial_shared),
            own=own,
            opt_state=self._put(self.initial_opt),
            ema=jax.tree.map(jnp.copy, own) if self.config.ema_decay else None,
            runs=[TrainState(tree=None, opt_state=None, ema=None) for _ in self.variants],
        )

    def restore_variants(self, directory: Path) -> VariantState:
        state = restore_variant_state(directory, self.initial_variant_state())
        state.shared, state.own, state.opt_state, state.ema = self._put((state.shared, state.own, state.opt_state, state.ema))
        return state

    def _join(self, shared: Sequence, own: Sequence) -> Any:
        shared, own = iter(shared), iter(own)
        return jax.tree.unflatten(self._treedef, [next(shared) if frozen else next(own) for frozen in self._frozen])

    def _own(self, tree: Any) -> list:
        return [x for x, frozen in zip(jax.tree.leaves(tree), self._frozen) if not frozen]

    def variant_state(self, state: VariantState, k: int, host: VariantState | None = None) -> TrainState:
        """Variant k's TrainState with host arrays: what its own run would hold
        (`save_state` writes it as an ordinary checkpoint).

        Args:
            host: `state.on_host()`, made once for several calls.
        """
        host = host or state.on_host()
        run = state.runs[k]
        run.tree = self._join(host.shared, [x[k] for x in host.own])
        run.opt_state = jax.tree.map(lambda x: x[k], host.opt_state)
        run.ema = None if host.ema is None else self._join(host.shared, [x[k] for x in host.ema])
        return run

    # -- jitted step -------------------------------------------------------

    def _variant_step(self, own, opt_state, ema, constants, batch, lr_scale, decay, active, *, shared):
        """Trainer._step of one variant (its lambda_tau `decay`) on the tree
        rebuilt from the shared frozen leaves; a variant that is not `active`
        keeps its arrays. Only the variant's own leaves come back (the frozen
        ones are unchanged by the step)."""
        ema_tree = None if ema is None else self._join(shared, ema)
        tree, new_opt_state, ema_tree, loss = Trainer._step(
            self, self._join(shared, own), opt_state, ema_tree, constants, batch, lr_scale, decay
        )
        new = (self._own(tree), new_opt_state, None if ema_tree is None else self._own(ema_tree))
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, (own, opt_state, ema)), loss

    def _variants_step(self, own, opt_state, ema, shared, constants, batch, lr_scale, decay, active, *,
                       constants_axis, batch_axis):
        step = lambda *args: self._variant_step(*args, shared=shared)
        return jax.vmap(step, in_axes=(0, 0, 0, constants_axis, batch_axis, 0, 0, 0))(
            own, opt_state, ema, constants, batch, lr_scale, decay, active
        )

    def train_variants(self, state: VariantState, batch, active: Sequence[bool]) -> np.ndarray:
        """One optimiser step of every active variant, in place; returns the K batch losses."""
        lr_scale = np.asarray([self.lr_scale(run) for run in state.runs], self.dtype)
        (state.own, state.opt_state, state.ema), loss = self._train_variants(
            state.own, state.opt_state, state.ema, state.shared, self.stacked_constants, batch, lr_scale,
            self.decays, np.asarray(active), constants_axis=self.constants_axis,
            batch_axis=None if self.shared_batches else 0,
        )
        for run, on in zip(state.runs, active):
            run.step += int(on)
        return np.asarray(loss)

    def stack_variants(self, train: Sequence[tuple], indices: Sequence[Sequence[int]]):
        """The batch of every variant: frames indices[k] of train[k]'s graphs.

        One seed: the variants' batch is one and the same (leading axis: device).
        Several: each variant's shards padded to a common budget (axes: variant, device).
        """
        if self.shared_batches:
            return self.stack(train[0][0], indices[0])[0]
        parts = [part for (graphs, _), idx in zip(train, indices) for part in self.shard_parts(graphs, idx)[0]]
        stacked = jax.tree.map(lambda x: x.reshape((len(self.variants), self.n_devices) + x.shape[1:]), self.pad_parts(parts))
        return jax.device_put(stacked, self.batch_sharding)

    # -- loop --------------------------------------------------------------

    def fit_variants(
        self,
        state: VariantState,
        train: Sequence[tuple],
        valid: Sequence[tuple],
        *,
        save: Callable[[VariantState, str], None] | None = None,
        on_best: Callable[[int, TrainState, Any, dict], None] | None = None,
        on_epoch: Callable[[int, TrainState], None] | None = None,
        progress: bool = True,
    ) -> VariantState:
        """Train every variant from `state` to the last epoch (or its early stop).

        Args:
            train, valid: per variant, (graphs, frames); training sets of one size.
            save: save(state, "last") every `checkpoint_every` steps and after every epoch.
            on_best: on_best(k, run, effective params, valid metrics) on a new
                best of variant k; `run` is its TrainState with host arrays.
            on_epoch: on_epoch(k, run) after variant k's row is appended to `run.history`.
            progress: show a tqdm bar per epoch.
        """
        from tqdm import tqdm

        n_train = len(train[0][1])
        if any(len(frames) != n_train for _, frames in train):
            raise ValueError("variants' training sets differ in size")
        n_batches = -(-n_train // self.config.batch_size)
        self.total_steps = n_batches * self.config.epochs
        names = variant_names(self.variants)
        while True:
            active = [run.epoch < self.config.epochs and not run.stopped for run in state.runs]
            if not any(active):
                return state
            lead = state.runs[active.index(True)]  # every active variant is at the same loader position
            orders = [self.epoch_batches(n_train, lead.epoch, seed=v.seed) for v in self.variants]
            started = time.perf_counter()
            limit = self.config.time_limit_s
            desc = f"epoch {lead.epoch + 1}/{self.config.epochs}"
            if limit is not None:
                desc = f"epoch {lead.epoch + 1}, {max(limit - lead.wall, 0.0):.0f} s left"
            bar = tqdm(total=n_batches, initial=lead.batch, desc=desc, unit="batch", disable=not progress, leave=False)
            while lead.batch < n_batches:
                if limit is not None and lead.wall >= limit:
                    break
                batch = self.stack_variants(train, [order[lead.batch] for order in orders])
                losses = self.train_variants(state, batch, active)
                elapsed = time.perf_counter() - started
                started = time.perf_counter()
                for k, run in enumerate(state.runs):
                    if not active[k]:
                        continue
                    if not math.isfinite(losses[k]):
                        raise FloatingPointError(f"{names[k]}: training loss became {losses[k]} at step {run.step} (lower --lr?)")
                    run.epoch_loss += float(losses[k])
                    run.epoch_batches += 1
                    run.batch += 1
                    run.wall += elapsed
                bar.update(1)
                bar.set_postfix(loss=" ".join(f"{run.epoch_loss / max(run.epoch_batches, 1):.4g}" for run in state.runs))
                if save is not None and lead.step % self.config.checkpoint_every == 0 and lead.batch < n_batches:
                    save(state, "last")
            bar.close()
            evaluated = {}
            host = state.on_host()
            for k in (k for k, on in enumerate(active) if on):
                run = self.variant_state(state, k, host)
                params = self._effective(run.ema if run.ema is not None else run.tree)
                self.set_constants(self.variant_constants[k])
                evaluated[k] = (params, self.evaluate(params, *valid[k]))
            elapsed = time.perf_counter() - started
            for k, (params, metrics) in evaluated.items():
                run = state.runs[k]
                run.wall += elapsed
                best = (lambda r, p, m, k=k: on_best(k, r, p, m)) if on_best is not None else None
                self._end_epoch(run, metrics, params, None, best)
                if limit is not None and run.wall >= limit:
                    run.stopped = True
                if on_epoch is not None:
                    on_epoch(k, run)
                run.tree = run.opt_state = run.ema = None
            if save is not None:
                save(state, "last")


def finetune_variants(
    model_dir: str | Path,
    run_dir: str | Path,
    *,
    variants: Sequence[Variant],
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
) -> dict[str, Any]:
    """`finetune` for K variants in one run; returns summary.json's content.

    Variant k's directory RUN_DIR/<name> holds what `finetune(..., config with
    threshold_decay and seed of variant k)` would write (except checkpoints/last,
    which is shared at RUN_DIR/checkpoints/last).

    Args:
        variants: the (lambda_tau, seed) pairs; config.threshold_decay and
            config.seed are ignored.
        on_checkpoint: called with (state, kind) after each shared checkpoint.
        magmom: not supported with variants (must be None).
        others: as for `finetune`.
    """
    started = time.perf_counter()
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    read_options = read_options or {}
    variants = list(variants)
    names = variant_names(variants)
    if not variants or len(set(variants)) != len(variants):
        raise SparseEqvError(f"{len(variants)} variant(s), {len(set(variants))} distinct: give distinct values")
    if method.method != "str" and len({v.threshold_decay for v in variants}) > 1:
        raise SparseEqvError(f"several --threshold-decay values need --method str (not {method.method})")
    if magmom is not None:
        raise SparseEqvError("--magmom is not supported with several variants (--threshold-decay / --seeds lists)")
    if jax.process_count() > 1:
        raise SparseEqvError("several variants run in one process (no --distributed): use one value per run")
    check_run_options(run_dir, e0s, overwrite, resume)

    model_config, variables, dtype = load_base(model_dir)
    numbers, cutoff = model_config["atomic_numbers"], float(model_config["r_max"])
    all_train, valid_frames, test_frames = read_inputs(train, valid, test, read_options)
    test_graphs = make_graphs(test_frames, numbers, cutoff) if test_frames else []
    splits: dict[int | None, tuple] = {}  # by the seed that split --train (None: --valid given)
    for v in variants:
        key = None if valid is not None else v.seed
        if key not in splits:
            tr, va = (all_train, valid_frames) if key is None else split_frames(all_train, valid_fraction, v.seed, Path(train))
            splits[key] = ((make_graphs(tr, numbers, cutoff), tr), (make_graphs(va, numbers, cutoff), va))
    data = [splits[None if valid is not None else v.seed] for v in variants]

    module = build_model(model_config)
    bases = {}
    for k, v in enumerate(variants):
        key = v.seed if method.method == "scratch" else None
        if key not in bases:
            bases[key] = variables["params"]
            if key is not None:
                (train_graphs, _), _ = data[k]
                bases[key] = scratch_params(module, train_graphs[0], v.seed, dtype, variables["params"], model_dir)
    base_params = [bases[v.seed if method.method == "scratch" else None] for v in variants]
    fine_method = make_method(method, base_params[0], model_config)
    trainer = VariantTrainer(module, variables["constants"], fine_method, base_params, config, variants,
                             n_devices=n_devices, dtype=jnp.dtype(dtype), cutoff=cutoff)
    trainer.fit_budgets(*[graphs for pairs in splits.values() for graphs, _ in pairs], test_graphs)

    fits: dict[tuple, tuple] = {}
    for k, v in enumerate(variants):
        key = (None if valid is not None else v.seed, v.seed if method.method == "scratch" else None)
        if key not in fits:
            shift, shifted = np.zeros(len(numbers)), variables
            if e0s == "fit":
                (graphs, frames), _ = data[k]
                shift, shifted = fit_e0s(trainer, base_params[k], graphs, frames, model_config, variables)
            fits[key] = (shift, shifted["constants"])
    e0 = [fits[(None if valid is not None else v.seed, v.seed if method.method == "scratch" else None)] for v in variants]
    trainer.set_variant_constants([constants for _, constants in e0])

    infos = []
    for k, (v, cfg) in enumerate(zip(variants, trainer.configs)):
        (_, train_frames), (_, variant_valid) = data[k]
        info = run_info(
            model_dir, model_config, method, fine_method, cfg, e0s=e0s, e0_shift=e0[k][0], train=train, valid=valid,
            valid_fraction=valid_fraction, test=test,
            n_frames={"train": len(train_frames), "valid": len(variant_valid), "test": len(test_frames)},
            elements=training_elements(train_frames), n_devices=trainer.n_devices, magmom=None,
        )
        infos.append({**info, "variant_of": str(run_dir.absolute())})
    overview = {
        "variants": [{"name": n, "threshold_decay": v.threshold_decay, "seed": v.seed} for n, v in zip(names, variants)],
        "shared_batches": trainer.shared_batches,
        "options": {"method": dataclasses.asdict(method), "train": dataclasses.asdict(config), "e0s": e0s},
    }
    if resume:
        previous = json.loads((run_dir / VARIANTS_FILE).read_text())
        if previous["variants"] != overview["variants"]:
            raise SparseEqvError(f"{run_dir}: --resume with other variants than the run was started with")
        for name, info in zip(names, infos):
            check_resume(run_dir, run_dir / name / "run.json", info)
        state = trainer.restore_variants(run_dir / "checkpoints" / "last")
    else:
        with atomic_directory(run_dir, overwrite=overwrite) as tmp:
            (tmp / VARIANTS_FILE).write_text(json.dumps(overview, indent=1))
            for name, info in zip(names, infos):
                (tmp / name).mkdir()
                (tmp / name / "run.json").write_text(json.dumps(info, indent=1))
        state = trainer.initial_variant_state()

    def save(state: VariantState, kind: str) -> None:
        save_state(run_dir / "checkpoints" / kind, state)
        if on_checkpoint is not None:
            on_checkpoint(state, kind)

    def on_best(k: int, run: TrainState, params: Any, metrics: dict) -> None:
        tree = run.ema if run.ema is not None else run.tree
        write_best(run_dir / names[k], model_config, e0[k][1], base_params[k], fine_method, tree, params)
        save_state(run_dir / names[k] / "checkpoints" / "best", run)

    def on_epoch(k: int, run: TrainState) -> None:
        _write_csv(run_dir / names[k] / "log.csv", run.history)
        write_train_log(run_dir / names[k], run.history, config.epochs)

    state = trainer.fit_variants(
        state, [train_pair for train_pair, _ in data], [valid_pair for _, valid_pair in data],
        save=save, on_best=on_best, on_epoch=on_epoch, progress=progress,
    )

    results = {}
    for k, (name, run) in enumerate(zip(names, state.runs)):
        trainer.set_constants(trainer.variant_constants[k])
        result = best_metrics(run_dir / name, method.method, run, trainer, data[k][1], (test_graphs, test_frames), started)
        _write_json(run_dir / name / "metrics.json", result)
        results[name] = {"threshold_decay": variants[k].threshold_decay, "seed": variants[k].seed, **result}
    summary = {
        "variants": results,
        "shared_batches": trainer.shared_batches,
        "train_wall_s": max(run.wall for run in state.runs),
        "compiles": dict(trainer.compiles),
        "session_wall_s": time.perf_counter() - started,
    }
    _write_json(run_dir / SUMMARY_FILE, summary)
    return summary


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
