"""The fine-tuning loop: one jitted, data-parallel train step over padded batches.

Data parallel: a batch of `batch_size` frames is split into one shard per
device; every shard is padded to the same budget and the shards are stacked
on a leading axis that is sharded over a 1-d device `Mesh` ("data"). The
step vmaps the per-shard loss sums over that axis and adds them up, so the
loss (and its gradient) is that of the whole batch whatever the number of
devices; XLA inserts the all-reduce. State is replicated.

Compilation: budgets come from a geometric grid (`GraphBudget.round_up`)
with a fixed number of graphs per shard, so an epoch compiles a handful of
times; the number of traces of each jitted function is counted. Once the
run's frames are known (`fit_budgets`), no budget is larger than the largest
batch those frames can form, so a set of equal-size frames is padded by one
node rather than up to the next grid value (`one_budget`: every batch is
padded to that largest budget).

Determinism and resume: the order of the training frames in epoch e is a
permutation drawn from numpy's generator seeded by (seed, e). The loader
position (epoch, next batch) and everything else the run depends on (trainable
tree, optimiser state, EMA, schedule and early-stopping counters, the log
rows) is in `TrainState`, which is checkpointed with orbax; a run killed
anywhere and resumed from its last checkpoint ends with the same params as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_eqv import distributed
from sparse_eqv.atomic_write import atomic_directory
from sparse_eqv.checkpoint import pytree_checkpointer
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph
from sparse_eqv.errors import CheckpointError, DataError, SparseEqvError, out_of_memory
from sparse_eqv.finetune.losses import LossWeights, error_metrics, loss_sums, total_loss
from sparse_eqv.finetune.optim import make_optimizer, scale_updates
from sparse_eqv.finetune.str import SCORE_LR
from sparse_eqv.potential import energy_forces_stress

STATE_FILE = "state.json"
REPLAY_STREAM = 1  # the second element of the replay draws' seed, apart from the epoch permutations
ARRAYS_DIR = "arrays"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of a fine-tuning run (the CLI's flags).

    Attributes:
        epochs, batch_size (frames per step, over all devices), lr, seed.
        score_lr: STR score learning rate (None: lr; default `str.SCORE_LR`).
        threshold_decay: lambda_tau, weight decay on STR scores.
        dense_weight_decay: weight decay on dense leaves (full, scratch).
        dense_lr: learning rate of dense leaves, e.g. a new moment head (None: lr).
        clip_norm: global gradient-norm clip (None: off).
        schedule: "plateau", "cosine" or "constant".
        plateau_factor, plateau_patience: lr *= factor after `patience`
            epochs without a better validation loss.
        patience: early stopping after this many epochs without improvement (None: off).
        ema_decay: exponential moving average of trainable leaves (None: off);
            validation, best and final params use the average.
        checkpoint_every: save the training state every this many steps
            (and at the end of every epoch).
        weights: loss weights.
        replay_weight: weight of the replay batch's loss added at every
            step (runs with replay frames, see `Trainer.fit`).
        time_limit_s: stop training once this many seconds (of `fit`'s
            wall time, compilation included) have passed; the epoch in
            progress ends early and is validated (None: off).
        one_budget: pad every batch to one budget that fits any batch of the
            run's frames, so each jitted function compiles once (more padding
            when frames differ in size).
    """

    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    score_lr: float | None = SCORE_LR
    threshold_decay: float = 0.05
    dense_weight_decay: float = 0.0
    dense_lr: float | None = None
    clip_norm: float | None = 10.0
    schedule: str = "plateau"
    plateau_factor: float = 0.8
    plateau_patience: int = 3
    patience: int | None = None
    ema_decay: float | None = None
    checkpoint_every: int = 50
    weights: LossWeights = LossWeights()
    replay_weight: float = 1.0
    time_limit_s: float | None = None
    one_budget: bool = False


@dataclasses.dataclass
class TrainState:
    """Everything a run depends on; checkpointed whole.

    Attributes:
        tree: the method's trainable tree (frozen base included).
        opt_state: optax state (none for frozen leaves).
        ema: moving average of `tree`, or None.
        step: optimiser steps done.
        epoch: current epoch (0-based); batch: next batch within it (loader position).
        lr_scale: schedule factor on the peak lr (plateau).
        best_loss, best_epoch: best validation loss so far.
        plateau_best, bad_epochs: plateau-schedule counters.
        epoch_loss, epoch_batches: running train loss of the current epoch.
        stopped: early stopping triggered.
        wall: seconds spent training (summed over resumed sessions).
        history: one dict per finished epoch (the CSV log rows).
    """

    tree: Any
    opt_state: Any
    ema: Any
    step: int = 0
    epoch: int = 0
    batch: int = 0
    lr_scale: float = 1.0
    best_loss: float = math.inf
    best_epoch: int = -1
    plateau_best: float = math.inf
    bad_epochs: int = 0
    epoch_loss: float = 0.0
    epoch_batches: int = 0
    stopped: bool = False
    wall: float = 0.0
    history: list = dataclasses.field(default_factory=list)

    _SCALARS = (
        "step", "epoch", "batch", "lr_scale", "best_loss", "best_epoch", "plateau_best",
        "bad_epochs", "epoch_loss", "epoch_batches", "stopped", "wall", "history",
    )

    def arrays(self) -> dict[str, Any]:
        return {"tree": self.tree, "opt_state": self.opt_state, "ema": self.ema}

    def scalars(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SCALARS}


def save_state(directory: Path, state: TrainState) -> None:
    """Write the state atomically: orbax arrays (flattened leaves) + JSON scalars."""
    leaves = jax.tree.leaves(state.arrays())
    with atomic_directory(directory, overwrite=True) as tmp:
        arrays = {f"{i:06d}": np.asarray(x) for i, x in enumerate(leaves)}
        pytree_checkpointer().save((tmp / ARRAYS_DIR).absolute(), arrays)
        scalars = state.scalars()
        scalars["n_leaves"] = len(leaves)
        (tmp / STATE_FILE).write_text(json.dumps(scalars, indent=1))


def read_saved_arrays(directory: Path, template_arrays: Any) -> Any:
    """The array tree written by `save_state`, checked leaf by leaf against `template_arrays`' shapes."""
    template_leaves = jax.tree.leaves(template_arrays)
    arrays = pytree_checkpointer().restore((directory / ARRAYS_DIR).absolute())
    leaves = [np.asarray(arrays[f"{i:06d}"]) for i in range(len(template_leaves))]
    for i, (a, b) in enumerate(zip(leaves, template_leaves)):
        if a.shape != np.shape(b):
            raise CheckpointError(f"{directory}: leaf {i} has shape {a.shape}, this run expects {np.shape(b)}")
    return jax.tree.unflatten(jax.tree.structure(template_arrays), leaves)


def restore_state(directory: Path, template: TrainState) -> TrainState:
    """Read a state saved by `save_state`; `template` gives the tree structure."""
    scalars = json.loads((directory / STATE_FILE).read_text())
    if scalars.pop("n_leaves") != len(jax.tree.leaves(template.arrays())):
        raise CheckpointError(f"{directory}: checkpoint does not match this run's method and model (leaf count)")
    return TrainState(**read_saved_arrays(directory, template.arrays()), **scalars)


def make_graphs(frames: Sequence[Frame], atomic_numbers: Sequence[int], cutoff: float) -> list[jraph.GraphsTuple]:
    """One graph per frame; raises DataError naming the frame on bad input."""
    if not frames:
        raise DataError("the training set is empty")
    return [frame_to_graph(f, atomic_numbers, cutoff) for f in frames]


def _masked_copy(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
    """The same graph with every label weight 0: fills a short shard."""
    weights = {k: np.zeros_like(v) for k, v in graph.globals.items() if k.endswith("_weight")}
    return graph._replace(globals={**graph.globals, **weights})


class Trainer:
    """Fine-tunes one method on one model; also evaluates any params.

    Args:
        module: the Flax model (`build_model(config)`).
        constants: the model's constants (never trained).
        method: STR, ELoRA or Full (see `sparse_eqv.finetune`).
        base_params: the params the method starts from.
        train_config: options.
        n_devices: devices to use (default: all local ones; with several
            processes, all devices of the job, see `sparse_eqv.distributed`).
        dtype: float dtype of graphs and params.
        cutoff: the model's r_max, Å (padding edges get this length and carry
            no messages; see `sparse_eqv.potential`).
    """

    def __init__(
        self,
        module,
        constants: Any,
        method,
        base_params: Any,
        train_config: TrainConfig,
        *,
        n_devices: int | None = None,
        dtype=jnp.float64,
        cutoff: float | None = None,
    ):
        self.module = module
        self.method = method
        self.config = train_config
        self.dtype = dtype
        self.cutoff = cutoff
        devices = distributed.devices()
        self.n_devices = len(devices) if n_devices is None else n_devices
        if not 1 <= self.n_devices <= len(devices):
            raise ValueError(f"n_devices={n_devices}, but {len(devices)} device(s) are available")
        self.mesh = Mesh(np.array(devices[: self.n_devices]), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec("data"))
        self.constants = self._put(constants)
        self.base_params = base_params
        self.compiles = {"train": 0, "eval": 0}
        self.budgets: set[GraphBudget] = set()
        self.largest_budget: GraphBudget | None = None
        rng = jax.random.PRNGKey(train_config.seed)
        tree = self._cast(method.init(base_params, rng))
        self.labels = method.labels(tree)
        self.optimizer = self.optimizer_with(train_config.threshold_decay)
        self.initial_tree = jax.tree.map(np.asarray, tree)  # host copy: the step donates device buffers
        self.total_steps: int | None = None
        self._train_step = jax.jit(self._step, donate_argnums=(0, 1, 2))
        # Replicated outputs: every process (several hosts) can read all predictions.
        self._eval_step = jax.jit(self._evaluate_batch, out_shardings=self.replicated)
        self._effective = jax.jit(method.effective)

    # -- state -------------------------------------------------------------

    def optimizer_with(self, threshold_decay) -> optax.GradientTransformation:
        """The run's optimiser with this lambda_tau. The step passes it as an
        argument, so runs that differ only in lambda_tau compile alike (and
        share a persistent compilation cache); `variants` vmaps over it."""
        c = self.config
        return make_optimizer(
            self.labels,
            lr=c.lr,
            threshold_decay=threshold_decay,
            score_lr=c.score_lr,
            dense_weight_decay=c.dense_weight_decay,
            clip_norm=c.clip_norm,
            dense_lr=c.dense_lr,
        )

    def _cast(self, tree):
        return jax.tree.map(lambda x: jnp.asarray(x, self.dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)

    def _put(self, tree):
        return jax.device_put(tree, self.replicated)

    def initial_state(self) -> TrainState:
        tree = self._put(self.initial_tree)
        opt_state = self._put(self.optimizer.init(tree))
        ema = jax.tree.map(jnp.copy, tree) if self.config.ema_decay else None
        return TrainState(tree=tree, opt_state=opt_state, ema=ema)

    def restore(self, directory: Path) -> TrainState:
        state = restore_state(directory, self.initial_state())
        state.tree, state.opt_state, state.ema = self._put((state.tree, state.opt_state, state.ema))
        return state

    # -- batches -----------------------------------------------------------

    def shard_size(self) -> int:
        return -(-self.config.batch_size // self.n_devices)

    def stack(self, graphs: Sequence[jraph.GraphsTuple], indices: Sequence[int],
              budget: GraphBudget | None = None) -> tuple[jraph.GraphsTuple, list[list[int]]]:
        """Split frames `indices` into one shard per device, pad alike, stack.

        Every shard is filled up to `shard_size()` graphs with label-free
        copies of its own (or the batch's first) frames, so a short last batch
        pads to the same budget as a full one when frames are alike in size.
        The budget is a pure function of the batch and the run's frames
        (`fit_budgets`), so resume stays exact; `budget` pads to that one instead.

        Returns:
            the stacked batch (leading axis: device) placed on the mesh, and
            the frame indices of each shard (real graphs come first).
        """
        parts, shards = self.shard_parts(graphs, indices)
        return jax.device_put(self.pad_parts(parts, budget), self.sharded), shards

    def shard_parts(self, graphs: Sequence[jraph.GraphsTuple], indices: Sequence[int]) -> tuple[list[list[jraph.GraphsTuple]], list[list[int]]]:
        """The graphs of each device's shard of frames `indices` (filled up to
        `shard_size()`), and the frame indices of each shard."""
        per = -(-len(indices) // self.n_devices)
        shards = [list(indices[d * per : (d + 1) * per]) for d in range(self.n_devices)]
        size = self.shard_size()
        parts = []
        for shard in shards:
            fill = shard or [indices[0]]
            parts.append([graphs[i] for i in shard] + [_masked_copy(graphs[fill[k % len(fill)]]) for k in range(size - len(shard))])
        return parts, shards

    def pad_parts(self, parts: Sequence[Sequence[jraph.GraphsTuple]], budget: GraphBudget | None = None) -> jraph.GraphsTuple:
        """Pad every shard to one budget (`budget`, else the largest shard's,
        rounded up) and stack them on a leading axis; host arrays in the run's dtype."""
        if budget is None and self.config.one_budget and self.largest_budget is not None:
            budget = self.largest_budget
        elif budget is None:
            n_node = max(sum(int(g.n_node[0]) for g in p) for p in parts)
            n_edge = max(sum(int(g.n_edge[0]) for g in p) for p in parts)
            budget = GraphBudget.round_up(n_node, n_edge, self.shard_size()).at_most(self.largest_budget)
        self.budgets.add(budget)
        padded = [batch_graphs(p, budget) for p in parts]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *padded)
        return jax.tree.map(lambda x: x.astype(self.dtype) if np.issubdtype(x.dtype, np.floating) else x, stacked)

    def fit_budgets(self, *graph_sets: Sequence[jraph.GraphsTuple]) -> GraphBudget:
        """Bound every later budget by the smallest that fits any `shard_size()`
        graphs of these sets (the run's frames; a larger batch no longer fits),
        or with `one_budget` pad every batch to it (one compilation per function)."""
        self.largest_budget = GraphBudget.fitting_any([g for graphs in graph_sets for g in graphs], self.shard_size())
        return self.largest_budget

    def replay_batch(self, n_frames: int, step: int) -> list[int]:
        """Indices of the replay frames of optimiser step `step`: `batch_size`
        distinct frames (all when fewer), drawn by numpy seeded with (seed,
        REPLAY_STREAM, step), so a resumed run draws the same ones."""
        rng = np.random.default_rng([self.config.seed, REPLAY_STREAM, step])
        return sorted(rng.choice(n_frames, size=min(self.config.batch_size, n_frames), replace=False).tolist())

    def epoch_batches(self, n_frames: int, epoch: int, seed: int | None = None) -> list[list[int]]:
        """Frame indices of each batch of epoch `epoch` (seeded by (seed, epoch);
        seed: the run's unless given)."""
        order = np.random.default_rng([self.config.seed if seed is None else seed, epoch]).permutation(n_frames)
        b = self.config.batch_size
        return [order[i : i + b].tolist() for i in range(0, n_frames, b)]

    # -- jitted functions --------------------------------------------------

    def _variables(self, params, constants):
        return {"params": params, "constants": constants}

    def _shard_sums(self, params, constants, graph):
        pred = energy_forces_stress(self.module.apply, self._variables(params, constants), graph, self.cutoff)
        return loss_sums(pred, graph, self.config.weights), pred

    def _batch_loss(self, tree, constants, batch):
        params = self.method.effective(tree)
        sums, _ = jax.vmap(lambda g: self._shard_sums(params, constants, g))(batch)
        sums = jax.tree.map(lambda x: x.sum(0), sums)
        return total_loss(sums, self.config.weights)

    def _replayed_loss(self, tree, constants, batch, replay):
        """The batch's loss plus, with a replay batch, replay_weight times its loss."""
        loss = self._batch_loss(tree, constants, batch)
        if replay is not None:
            loss = loss + self.config.replay_weight * self._batch_loss(tree, constants, replay)
        return loss

    def _step(self, tree, opt_state, ema, constants, batch, lr_scale, threshold_decay, replay=None):
        self.compiles["train"] += 1  # runs once per trace, i.e. per compilation
        loss, grads = jax.value_and_grad(self._replayed_loss)(tree, constants, batch, replay)
        updates, opt_state = self.optimizer_with(threshold_decay).update(grads, opt_state, tree)
        tree = optax.apply_updates(tree, scale_updates(updates, lr_scale))
        if ema is not None:
            decay = self.config.ema_decay
            ema = jax.tree.map(
                lambda label, e, t: t if label == "frozen" else decay * e + (1.0 - decay) * t, self.labels, ema, tree
            )
        return tree, opt_state, ema, loss

    def _evaluate_batch(self, params, constants, batch):
        self.compiles["eval"] += 1
        sums, pred = jax.vmap(lambda g: self._shard_sums(params, constants, g))(batch)
        return jax.tree.map(lambda x: x.sum(0), sums), pred

    # -- public ------------------------------------------------------------

    def effective_params(self, state: TrainState) -> Any:
        """The params the model runs with (from the EMA when enabled)."""
        return self._effective(state.ema if state.ema is not None else state.tree)

    def train_step(self, state: TrainState, batch: jraph.GraphsTuple, replay: jraph.GraphsTuple | None = None) -> float:
        """One optimiser step in place on `state`; returns the batch loss (plus
        the weighted loss of the `replay` batch, when given)."""
        lr_scale = jnp.asarray(self.lr_scale(state), self.dtype)
        threshold_decay = jnp.asarray(self.config.threshold_decay, self.dtype)
        try:
            state.tree, state.opt_state, state.ema, loss = self._train_step(
                state.tree, state.opt_state, state.ema, self.constants, batch, lr_scale, threshold_decay, replay
            )
            loss = float(loss)
        except jax.errors.JaxRuntimeError as error:
            if out_of_memory(error):
                raise self._memory_error("a training step", batch) from error
            raise
        state.step += 1
        return loss

    def _memory_error(self, what: str, batch: jraph.GraphsTuple) -> SparseEqvError:
        """The error for XLA's out-of-memory in `what`: names the option to lower."""
        n_node, n_edge = batch.nodes["species"].shape[-1], batch.senders.shape[-1]
        return SparseEqvError(
            f"out of memory in {what} on {self.config.batch_size} frames ({self.n_devices} device(s), each padded "
            f"to {n_node} atoms and {n_edge} edges): lower --batch-size (now {self.config.batch_size})"
        )

    def lr_scale(self, state: TrainState) -> float:
        """Factor on the peak lr: cosine over the run's steps, or the plateau factor."""
        if self.config.schedule == "cosine":
            total = self.total_steps or 1
            return 0.5 * (1.0 + math.cos(math.pi * min(state.step, total) / max(total, 1)))
        return state.lr_scale

    def set_constants(self, constants: Any) -> None:
        """Replace the model constants (e.g. after an E0 fit)."""
        self.constants = self._put(constants)

    def predict(self, params: Any, graphs: Sequence[jraph.GraphsTuple], frames: Sequence[Frame]) -> tuple[list[dict], float]:
        """Per-frame predictions (energy, forces, stress) and the weighted loss."""
        params = self._put(params)
        out: list[dict | None] = [None] * len(frames)
        total = None
        for start in range(0, len(frames), self.config.batch_size):
            indices = list(range(start, min(start + self.config.batch_size, len(frames))))
            batch, shards = self.stack(graphs, indices)
            try:
                sums, pred = self._eval_step(params, self.constants, batch)
                pred = jax.tree.map(np.asarray, pred)
                sums = {k: float(v) for k, v in sums.items()}
            except jax.errors.JaxRuntimeError as error:
                if out_of_memory(error):
                    raise self._memory_error("an evaluation batch", batch) from error
                raise
            total = sums if total is None else {k: total[k] + sums[k] for k in total}
            for d, shard in enumerate(shards):
                offset = 0
                for g, i in enumerate(shard):
                    n = frames[i].num_atoms
                    out[i] = {
                        "energy": float(pred["energy"][d, g]),
                        "forces": pred["forces"][d, offset : offset + n],
                        "stress": pred["stress"][d, g],
                    }
                    if "magmoms" in pred:  # a model with a magnetic-moment head
                        out[i]["magmoms"] = pred["magmoms"][d, offset : offset + n]
                    offset += n
        loss = float(total_loss({k: jnp.asarray(v) for k, v in total.items()}, self.config.weights))
        return out, loss

    def evaluate(self, params: Any, graphs, frames) -> dict[str, Any]:
        """error_metrics plus the weighted loss."""
        predictions, loss = self.predict(params, graphs, frames)
        return {**error_metrics(frames, predictions), "loss": loss}

    def fit(
        self,
        state: TrainState,
        train: tuple[Sequence[jraph.GraphsTuple], Sequence[Frame]],
        valid: tuple[Sequence[jraph.GraphsTuple], Sequence[Frame]],
        *,
        save: Callable[[TrainState, str], None] | None = None,
        on_best: Callable[[TrainState, Any, dict], None] | None = None,
        on_epoch: Callable[[TrainState], None] | None = None,
        progress: bool = True,
        replay: tuple[Sequence[jraph.GraphsTuple], Sequence[Frame]] | None = None,
    ) -> TrainState:
        """Train from `state` to the last epoch (or early stop).

        Args:
            train, valid: (graphs, frames).
            replay: (graphs, frames) of labelled replay frames: every step adds
                `replay_weight` times the loss of a `replay_batch` of them.
            save: called as save(state, "last") every `checkpoint_every` steps
                and after every epoch, and save(state, "best") on a new best.
            on_best: called with (state, effective params, valid metrics) on a new best.
            on_epoch: called after each epoch's row is appended to `state.history`.
            progress: show a tqdm bar per epoch.
        """
        from tqdm import tqdm

        train_graphs, train_frames = train
        # Replay batches are random mixes of the replay frames: padded to one budget that fits any of them,
        # the step compiles once per training budget, not once per mix.
        replay_budget = None if replay is None else GraphBudget.fitting_any(replay[0], self.shard_size())
        n_batches = -(-len(train_frames) // self.config.batch_size)
        self.total_steps = n_batches * self.config.epochs
        while state.epoch < self.config.epochs and not state.stopped:
            started = time.perf_counter()
            batches = self.epoch_batches(len(train_frames), state.epoch)
            limit = self.config.time_limit_s
            desc = f"epoch {state.epoch + 1}/{self.config.epochs}"
            if limit is not None:
                desc = f"epoch {state.epoch + 1}, {max(limit - state.wall, 0.0):.0f} s left"
            bar = tqdm(total=len(batches), initial=state.batch, desc=desc, unit="batch", disable=not progress,
                       leave=False)
            while state.batch < len(batches):
                if limit is not None and state.wall >= limit:
                    state.stopped = True
                    break
                batch, _ = self.stack(train_graphs, batches[state.batch])
                replay_batch = None
                if replay is not None:
                    replay_batch, _ = self.stack(replay[0], self.replay_batch(len(replay[1]), state.step), replay_budget)
                loss = self.train_step(state, batch, replay_batch)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss} at step {state.step} (lower --lr?)")
                state.epoch_loss += loss
                state.epoch_batches += 1
                state.batch += 1
                state.wall += time.perf_counter() - started
                started = time.perf_counter()
                bar.update(1)
                bar.set_postfix(loss=f"{state.epoch_loss / state.epoch_batches:.4g}")
                if save is not None and state.step % self.config.checkpoint_every == 0 and state.batch < len(batches):
                    save(state, "last")
            bar.close()
            params = self.effective_params(state)
            metrics = self.evaluate(params, *valid)
            state.wall += time.perf_counter() - started
            self._end_epoch(state, metrics, params, save, on_best)
            if limit is not None and state.wall >= limit:
                state.stopped = True
            if on_epoch is not None:
                on_epoch(state)
            if save is not None:
                save(state, "last")
        return state

    def _end_epoch(self, state: TrainState, metrics: dict, params, save, on_best) -> None:
        loss = metrics["loss"]
        improved = loss < state.best_loss
        if improved:
            state.best_loss, state.best_epoch = loss, state.epoch
        if loss < state.plateau_best * (1 - 1e-4):
            state.plateau_best, state.bad_epochs = loss, 0
        else:
            state.bad_epochs += 1
            if self.config.schedule == "plateau" and state.bad_epochs > self.config.plateau_patience:
                state.lr_scale *= self.config.plateau_factor
                state.bad_epochs = 0
        row = {
            "epoch": state.epoch + 1,
            "step": state.step,
            "lr": self.config.lr * self.lr_scale(state),
            "train_loss": state.epoch_loss / max(state.epoch_batches, 1),
            "valid_loss": loss,
            **{f"valid_{k}": v for k, v in metrics.items() if k not in ("loss", "n_frames")},
            "wall_s": state.wall,
            "epoch_s": state.wall - (state.history[-1]["wall_s"] if state.history else 0.0),
            "compiles": sum(self.compiles.values()),
        }
        if hasattr(self.method, "thresholded_delta"):
            from sparse_eqv.sparsity import layer_sparsity

            tree = state.ema or state.tree
            row["layer_sparsity"] = layer_sparsity(
                {k: np.asarray(v) for k, v in self.method.thresholded_delta(tree).items()}
            )
            thresholds = list(self.method.thresholds(tree).values())
            row["threshold_min"], row["threshold_median"], row["threshold_max"] = (
                float(np.min(thresholds)), float(np.median(thresholds)), float(np.max(thresholds)))
        state.history.append(row)
        state.epoch += 1
        state.batch = 0
        state.epoch_loss, state.epoch_batches = 0.0, 0
        if self.config.patience is not None and state.epoch - 1 - state.best_epoch >= self.config.patience:
            state.stopped = True
        if improved:
            if on_best is not None:
                on_best(state, params, metrics)
            if save is not None:
                save(state, "best")
