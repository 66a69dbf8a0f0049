"""The fine-tuning loop: one jitted, data-parallel train step for K >= 1 runs over padded batches.

Runs: the step trains K variants of one run at once, which differ in
lambda_tau and/or in the seed (`finetune --threshold-decay 0.01,0.05,0.3`,
`--seeds 0,1,2`); an ordinary run is K = 1. The variants' own leaves, their
optimiser state and EMA carry a leading axis of size K (`state.RunsState`);
the frozen base leaves are passed once, as an argument the gradient is not
taken with respect to, and one jitted step vmaps the per-run step over K.
lambda_tau enters as a per-run argument of the score AdamW's decoupled
decay, so one compilation serves every variant. Variant k equals the run
`finetune --threshold-decay lambda_k --seed seed_k` up to float round-off.
Variants with one seed share their batches (the geometry-only parts of the
model are computed once); variants with several seeds have their own split,
batch order and E0 fit, and their batches are stacked on the variant axis.

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
position (epoch, next batch) and everything else a run depends on (trainable
leaves, optimiser state, EMA, schedule and early-stopping counters, the log
rows) is in the state, which is checkpointed with orbax (`state.save_state`);
a run killed anywhere and resumed from its last checkpoint ends with the same
params as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
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
from tqdm import tqdm

from sparse_eqv import distributed
from sparse_eqv.data.frames import Frame
from sparse_eqv.data.graph import GraphBudget, batch_graphs, frame_to_graph
from sparse_eqv.errors import DataError, SparseEqvError, out_of_memory
from sparse_eqv.finetune.losses import LossWeights, error_metrics, loss_sums, total_loss
from sparse_eqv.finetune.optim import make_optimizer, scale_updates
from sparse_eqv.finetune.state import RunsState, TrainState, restore_runs_state, restore_state, save_state
from sparse_eqv.finetune.str import SCORE_LR
from sparse_eqv.potential import energy_forces_stress
from sparse_eqv.sparsity import layer_sparsity

REPLAY_STREAM = 1  # the second element of the replay draws' seed, apart from the epoch permutations


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


@dataclasses.dataclass(frozen=True)
class Variant:
    """One of the K runs a step trains: its lambda_tau and its seed."""

    threshold_decay: float
    seed: int


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
    """Fine-tunes K >= 1 variants of one method on one model in one jitted step; also evaluates any params.

    Args:
        module: the Flax model (`build_model(config)`).
        constants: the model's constants (never trained); per-variant E0-shifted
            ones come from `set_constants`.
        method: STR, ELoRA or Full (see `sparse_eqv.finetune`).
        base_params: the params the method starts from, or one per variant
            (they differ only for a fresh initialisation, --method scratch,
            with several seeds).
        train_config: options; its threshold_decay and seed are those of the
            run when `variants` is None.
        variants: the K variants (lambda_tau, seed) that share every other option.
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
        variants: Sequence[Variant] | None = None,
        *,
        n_devices: int | None = None,
        dtype=jnp.float64,
        cutoff: float | None = None,
    ):
        if variants is None:
            variants = [Variant(train_config.threshold_decay, train_config.seed)]
        bases = list(base_params) if isinstance(base_params, (list, tuple)) else [base_params] * len(variants)
        if not variants or len(bases) != len(variants):
            raise ValueError(f"{len(variants)} variant(s) with {len(bases)} base param set(s)")
        self.module = module
        self.method = method
        self.variants = tuple(variants)
        self.configs = [dataclasses.replace(train_config, threshold_decay=v.threshold_decay, seed=v.seed)
                        for v in self.variants]
        self.config = self.configs[0]
        self.dtype = dtype
        self.cutoff = cutoff
        devices = distributed.devices()
        self.n_devices = len(devices) if n_devices is None else n_devices
        if not 1 <= self.n_devices <= len(devices):
            raise ValueError(f"n_devices={n_devices}, but {len(devices)} device(s) are available")
        self.mesh = Mesh(np.array(devices[: self.n_devices]), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec("data"))
        self.compiles = {"train": 0, "eval": 0}
        self.budgets: set[GraphBudget] = set()
        self.largest_budget: GraphBudget | None = None
        self.total_steps: int | None = None

        # host copies: the step donates device buffers
        trees = [jax.tree.map(np.asarray, self._cast(method.init(base, jax.random.PRNGKey(c.seed))))
                 for base, c in zip(bases, self.configs)]
        self._treedef = jax.tree.structure(trees[0])
        labels = method.labels(trees[0])
        self._frozen = [label == "frozen" for label in jax.tree.leaves(labels)]
        leaves = [jax.tree.leaves(tree) for tree in trees]
        for i, frozen in enumerate(self._frozen):
            if frozen and any(not np.array_equal(other[i], leaves[0][i]) for other in leaves[1:]):
                raise ValueError(f"variants differ in frozen leaf {i}; only trainable leaves may differ")
        self.own_labels = self._own(labels)
        self.initial_shared = [x for x, frozen in zip(leaves[0], self._frozen) if frozen]
        own = [self._own(tree) for tree in trees]
        self.initial_own = [np.stack(xs) for xs in zip(*own)]
        self.initial_opt = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                        *[self.optimizer_with(c.threshold_decay).init(o) for o, c in zip(own, self.configs)])
        self.decays = np.asarray([v.threshold_decay for v in self.variants], dtype)
        self.shared_batches = len({v.seed for v in self.variants}) == 1
        self.batch_sharding = self.sharded if self.shared_batches else NamedSharding(self.mesh, PartitionSpec(None, "data"))
        self.set_constants([constants] * len(self.variants))
        self._train_step = jax.jit(self._step, static_argnames=("constants_axis", "batch_axis"), donate_argnums=(0, 1, 2))
        # Replicated outputs: every process (several hosts) can read all predictions.
        self._eval_step = jax.jit(self._evaluate_batch, out_shardings=self.replicated)
        self._effective = jax.jit(method.effective)

    # -- state -------------------------------------------------------------

    def optimizer_with(self, threshold_decay) -> optax.GradientTransformation:
        """The optimiser of the trainable (non-frozen) leaves with this lambda_tau.
        The step passes lambda_tau as an argument, so runs that differ only in it
        compile alike (and share a persistent compilation cache)."""
        c = self.config
        return make_optimizer(
            self.own_labels,
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

    def _join(self, shared: Sequence, own: Sequence) -> Any:
        """The method's trainable tree from its frozen and its own leaves."""
        shared, own = iter(shared), iter(own)
        return jax.tree.unflatten(self._treedef, [next(shared) if frozen else next(own) for frozen in self._frozen])

    def _own(self, tree: Any) -> list:
        """The non-frozen leaves of a trainable tree, in tree order."""
        return [x for x, frozen in zip(jax.tree.leaves(tree), self._frozen) if not frozen]

    def initial_state(self) -> RunsState:
        own = self._put(self.initial_own)
        return RunsState(
            shared=self._put(self.initial_shared),
            own=own,
            opt_state=self._put(self.initial_opt),
            ema=jax.tree.map(jnp.copy, own) if self.config.ema_decay else None,
            runs=[TrainState() for _ in self.variants],
        )

    def run_state(self, state: RunsState, k: int, host: RunsState | None = None) -> TrainState:
        """Run k's TrainState with host arrays (tree, optimiser state, EMA): what
        an ordinary run holds and checkpoints. Its counters are `state.runs[k]`'s.

        Args:
            host: `state.on_host()`, made once for several calls.
        """
        host = host or state.on_host()
        run = state.runs[k]
        run.tree = self._join(host.shared, [x[k] for x in host.own])
        run.opt_state = jax.tree.map(lambda x: x[k], host.opt_state)
        run.ema = None if host.ema is None else self._join(host.shared, [x[k] for x in host.ema])
        return run

    def save(self, directory: Path, state: RunsState) -> None:
        """Checkpoint `state`: an ordinary run (K = 1) as its TrainState, K > 1 runs whole."""
        if len(self.variants) == 1:
            run = self.run_state(state, 0)
            save_state(directory, run)
            run.tree = run.opt_state = run.ema = None
        else:
            save_state(directory, state)

    def restore(self, directory: Path) -> RunsState:
        """The state `save` wrote to `directory`, placed on the devices."""
        template = self.initial_state()
        if len(self.variants) == 1:
            run = restore_state(directory, self.run_state(template.on_host(), 0))
            own = [x[None] for x in self._own(run.tree)]
            state = RunsState(
                shared=[x for x, frozen in zip(jax.tree.leaves(run.tree), self._frozen) if frozen],
                own=own,
                opt_state=jax.tree.map(lambda x: np.asarray(x)[None], run.opt_state),
                ema=None if run.ema is None else [x[None] for x in self._own(run.ema)],
                runs=[run],
            )
            run.tree = run.opt_state = run.ema = None
        else:
            state = restore_runs_state(directory, template)
        state.shared, state.own, state.opt_state, state.ema = self._put((state.shared, state.own, state.opt_state, state.ema))
        return state

    def set_constants(self, constants: Sequence[Any]) -> None:
        """Per-variant model constants (e.g. after E0 fits); passed once to the step when they agree."""
        self.variant_constants = [jax.tree.map(np.asarray, c) for c in constants]
        first = jax.tree.leaves(self.variant_constants[0])
        same = all(all(np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(c))) for c in self.variant_constants[1:])
        self.constants_axis = None if same else 0
        stacked = self.variant_constants[0] if same else jax.tree.map(lambda *xs: np.stack(xs), *self.variant_constants)
        self.stacked_constants = self._put(stacked)
        self._eval_constants = [self._put(c) for c in self.variant_constants]

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

    def stack_variants(self, train: Sequence[tuple], indices: Sequence[Sequence[int]],
                       budget: GraphBudget | None = None) -> jraph.GraphsTuple:
        """The batch of every variant: frames indices[k] of train[k]'s graphs.

        One seed: the variants' batch is one and the same (leading axis: device).
        Several: each variant's shards padded to a common budget (axes: variant, device).
        """
        if self.shared_batches:
            return self.stack(train[0][0], indices[0], budget)[0]
        parts = [part for (graphs, _), idx in zip(train, indices) for part in self.shard_parts(graphs, idx)[0]]
        stacked = jax.tree.map(lambda x: x.reshape((len(self.variants), self.n_devices) + x.shape[1:]),
                               self.pad_parts(parts, budget))
        return jax.device_put(stacked, self.batch_sharding)

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

    def replay_batch(self, n_frames: int, step: int, seed: int | None = None) -> list[int]:
        """Indices of the replay frames of optimiser step `step`: `batch_size`
        distinct frames (all when fewer), drawn by numpy seeded with (seed,
        REPLAY_STREAM, step), so a resumed run draws the same ones (seed: the run's unless given)."""
        rng = np.random.default_rng([self.config.seed if seed is None else seed, REPLAY_STREAM, step])
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

    def _batch_loss(self, params, constants, batch):
        sums, _ = jax.vmap(lambda g: self._shard_sums(params, constants, g))(batch)
        sums = jax.tree.map(lambda x: x.sum(0), sums)
        return total_loss(sums, self.config.weights)

    def _loss(self, own, shared, constants, batch, replay):
        """The batch's loss plus, with a replay batch, replay_weight times its loss."""
        params = self.method.effective(self._join(shared, own))
        loss = self._batch_loss(params, constants, batch)
        if replay is not None:
            loss = loss + self.config.replay_weight * self._batch_loss(params, constants, replay)
        return loss

    def _run_step(self, own, opt_state, ema, constants, batch, replay, lr_scale, decay, active, *, shared):
        """One run's optimiser step (lambda_tau `decay`); gradients of its own leaves
        only. A run that is not `active` keeps its arrays."""
        loss, grads = jax.value_and_grad(self._loss)(own, shared, constants, batch, replay)
        updates, new_opt_state = self.optimizer_with(decay).update(grads, opt_state, own)
        new_own = optax.apply_updates(own, scale_updates(updates, lr_scale))
        new_ema = None
        if ema is not None:
            d = self.config.ema_decay
            new_ema = jax.tree.map(lambda e, t: d * e + (1.0 - d) * t, ema, new_own)
        new = (new_own, new_opt_state, new_ema)
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, (own, opt_state, ema)), loss

    def _step(self, own, opt_state, ema, shared, constants, batch, replay, lr_scale, decay, active, *,
              constants_axis, batch_axis):
        self.compiles["train"] += 1  # runs once per trace, i.e. per compilation
        step = functools.partial(self._run_step, shared=shared)
        return jax.vmap(step, in_axes=(0, 0, 0, constants_axis, batch_axis, batch_axis, 0, 0, 0))(
            own, opt_state, ema, constants, batch, replay, lr_scale, decay, active
        )

    def _evaluate_batch(self, params, constants, batch):
        self.compiles["eval"] += 1
        sums, pred = jax.vmap(lambda g: self._shard_sums(params, constants, g))(batch)
        return jax.tree.map(lambda x: x.sum(0), sums), pred

    # -- public ------------------------------------------------------------

    def effective_params(self, run: TrainState) -> Any:
        """The params a run's model runs with (from its EMA when enabled); `run` from `run_state`."""
        return self._effective(run.ema if run.ema is not None else run.tree)

    def train_step(self, state: RunsState, batch: jraph.GraphsTuple, replay: jraph.GraphsTuple | None = None,
                   active: Sequence[bool] | None = None) -> np.ndarray:
        """One optimiser step of every active run (default: all), in place on
        `state`; returns the K batch losses (plus the weighted loss of the
        `replay` batch, when given)."""
        active = [True] * len(self.variants) if active is None else list(active)
        lr_scale = np.asarray([self.lr_scale(run) for run in state.runs], self.dtype)
        try:
            (state.own, state.opt_state, state.ema), loss = self._train_step(
                state.own, state.opt_state, state.ema, state.shared, self.stacked_constants, batch, replay, lr_scale,
                self.decays, np.asarray(active), constants_axis=self.constants_axis,
                batch_axis=None if self.shared_batches else 0,
            )
            loss = np.asarray(loss)
        except jax.errors.JaxRuntimeError as error:
            if out_of_memory(error):
                raise self._memory_error("a training step", batch) from error
            raise
        for run, on in zip(state.runs, active):
            run.step += int(on)
        return loss

    def _memory_error(self, what: str, batch: jraph.GraphsTuple) -> SparseEqvError:
        """The error for XLA's out-of-memory in `what`: names the option to lower."""
        n_node, n_edge = batch.nodes["species"].shape[-1], batch.senders.shape[-1]
        return SparseEqvError(
            f"out of memory in {what} on {self.config.batch_size} frames ({self.n_devices} device(s), each padded "
            f"to {n_node} atoms and {n_edge} edges): lower --batch-size (now {self.config.batch_size})"
        )

    def lr_scale(self, run: TrainState) -> float:
        """Factor on the peak lr: cosine over the run's steps, or the plateau factor."""
        if self.config.schedule == "cosine":  # optax.cosine_decay_schedule's factor, without its eager jnp call per step
            total = max(self.total_steps or 1, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(run.step, total) / total))
        return run.lr_scale

    def predict(self, params: Any, graphs: Sequence[jraph.GraphsTuple], frames: Sequence[Frame],
                k: int = 0) -> tuple[list[dict], float]:
        """Per-frame predictions (energy, forces, stress) with variant k's
        constants, and the weighted loss."""
        params = self._put(params)
        out: list[dict | None] = [None] * len(frames)
        total = None
        for start in range(0, len(frames), self.config.batch_size):
            indices = list(range(start, min(start + self.config.batch_size, len(frames))))
            batch, shards = self.stack(graphs, indices)
            try:
                sums, pred = self._eval_step(params, self._eval_constants[k], batch)
                pred = jax.tree.map(np.asarray, pred)
                sums = {key: float(v) for key, v in sums.items()}
            except jax.errors.JaxRuntimeError as error:
                if out_of_memory(error):
                    raise self._memory_error("an evaluation batch", batch) from error
                raise
            total = sums if total is None else {key: total[key] + sums[key] for key in total}
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
        loss = float(total_loss({key: jnp.asarray(v) for key, v in total.items()}, self.config.weights))
        return out, loss

    def evaluate(self, params: Any, graphs, frames, k: int = 0) -> dict[str, Any]:
        """error_metrics plus the weighted loss (variant k's constants)."""
        predictions, loss = self.predict(params, graphs, frames, k)
        return {**error_metrics(frames, predictions), "loss": loss}

    def fit(
        self,
        state: RunsState,
        train: Sequence[tuple[Sequence[jraph.GraphsTuple], Sequence[Frame]]],
        valid: Sequence[tuple[Sequence[jraph.GraphsTuple], Sequence[Frame]]],
        *,
        save: Callable[[RunsState, str], None] | None = None,
        on_best: Callable[[int, TrainState, Any, dict], None] | None = None,
        on_epoch: Callable[[int, TrainState], None] | None = None,
        progress: bool = True,
        replay: tuple[Sequence[jraph.GraphsTuple], Sequence[Frame]] | None = None,
        names: Sequence[str] | None = None,
    ) -> RunsState:
        """Train every run from `state` to the last epoch (or its early stop).

        Args:
            train, valid: per run, (graphs, frames); training sets of one size.
            replay: (graphs, frames) of labelled replay frames: every step adds
                `replay_weight` times the loss of a `replay_batch` of them
                (drawn by each run's seed).
            save: save(state, "last") every `checkpoint_every` steps and after every epoch.
            on_best: on_best(k, run, effective params, valid metrics) on a new
                best of run k; `run` is its TrainState with host arrays.
            on_epoch: on_epoch(k, run) after run k's row is appended to `run.history`.
            progress: show a tqdm bar per epoch.
            names: the runs' names in error messages (K > 1).
        """
        n_train = len(train[0][1])
        if any(len(frames) != n_train for _, frames in train):
            raise ValueError("variants' training sets differ in size")
        n_batches = -(-n_train // self.config.batch_size)
        self.total_steps = n_batches * self.config.epochs
        # Replay batches are random mixes of the replay frames: padded to one budget that fits any of them,
        # the step compiles once per training budget, not once per mix.
        replay_budget = None if replay is None else GraphBudget.fitting_any(replay[0], self.shard_size())
        limit = self.config.time_limit_s
        while True:
            active = [run.epoch < self.config.epochs and not run.stopped for run in state.runs]
            if not any(active):
                return state
            lead = state.runs[active.index(True)]  # every active run is at the same loader position
            orders = [self.epoch_batches(n_train, lead.epoch, seed=v.seed) for v in self.variants]
            started = time.perf_counter()
            desc = f"epoch {lead.epoch + 1}/{self.config.epochs}"
            if limit is not None:
                desc = f"epoch {lead.epoch + 1}, {max(limit - lead.wall, 0.0):.0f} s left"
            bar = tqdm(total=n_batches, initial=lead.batch, desc=desc, unit="batch", disable=not progress, leave=False)
            while lead.batch < n_batches:
                if limit is not None and lead.wall >= limit:
                    break
                batch = self.stack_variants(train, [order[lead.batch] for order in orders])
                replay_batch = None
                if replay is not None:
                    replay_batch = self.stack_variants(
                        [replay] * len(self.variants),
                        [self.replay_batch(len(replay[1]), lead.step, v.seed) for v in self.variants], replay_budget)
                losses = self.train_step(state, batch, replay_batch, active)
                elapsed = time.perf_counter() - started
                started = time.perf_counter()
                for k, run in enumerate(state.runs):
                    if not active[k]:
                        continue
                    if not math.isfinite(losses[k]):
                        who = f"{names[k]}: " if names is not None and len(names) > 1 else ""
                        raise FloatingPointError(f"{who}training loss became {losses[k]} at step {run.step} (lower --lr?)")
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
                run = self.run_state(state, k, host)
                params = self.effective_params(run)
                evaluated[k] = (params, self.evaluate(params, *valid[k], k=k))
            elapsed = time.perf_counter() - started
            for k, (params, metrics) in evaluated.items():
                run = state.runs[k]
                run.wall += elapsed
                if self.end_epoch(run, metrics) and on_best is not None:
                    on_best(k, run, params, metrics)
                if limit is not None and run.wall >= limit:
                    run.stopped = True
                if on_epoch is not None:
                    on_epoch(k, run)
                run.tree = run.opt_state = run.ema = None
            if save is not None:
                save(state, "last")

    def end_epoch(self, run: TrainState, metrics: dict) -> bool:
        """Book an epoch's validation `metrics` into `run` (best, plateau and
        early-stopping counters, a log row; `run` holds its host arrays when
        the row reports STR sparsity); returns whether the epoch is a new best."""
        loss = metrics["loss"]
        improved = loss < run.best_loss
        if improved:
            run.best_loss, run.best_epoch = loss, run.epoch
        if loss < run.plateau_best * (1 - 1e-4):
            run.plateau_best, run.bad_epochs = loss, 0
        else:
            run.bad_epochs += 1
            if self.config.schedule == "plateau" and run.bad_epochs > self.config.plateau_patience:
                run.lr_scale *= self.config.plateau_factor
                run.bad_epochs = 0
        row = {
            "epoch": run.epoch + 1,
            "step": run.step,
            "lr": self.config.lr * self.lr_scale(run),
            "train_loss": run.epoch_loss / max(run.epoch_batches, 1),
            "valid_loss": loss,
            **{f"valid_{key}": v for key, v in metrics.items() if key not in ("loss", "n_frames")},
            "wall_s": run.wall,
            "epoch_s": run.wall - (run.history[-1]["wall_s"] if run.history else 0.0),
            "compiles": sum(self.compiles.values()),
        }
        if hasattr(self.method, "thresholded_delta") and run.tree is not None:
            tree = run.ema if run.ema is not None else run.tree
            row["layer_sparsity"] = layer_sparsity(
                {key: np.asarray(v) for key, v in self.method.thresholded_delta(tree).items()}
            )
            thresholds = list(self.method.thresholds(tree).values())
            row["threshold_min"], row["threshold_median"], row["threshold_max"] = (
                float(np.min(thresholds)), float(np.median(thresholds)), float(np.max(thresholds)))
        run.history.append(row)
        run.epoch += 1
        run.batch = 0
        run.epoch_loss, run.epoch_batches = 0.0, 0
        if self.config.patience is not None and run.epoch - 1 - run.best_epoch >= self.config.patience:
            run.stopped = True
        return improved
