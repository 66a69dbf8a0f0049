"""Side-by-side benchmark: converted Flax models vs the official torch packages (issue 7).

    python scripts/bench.py [--models sevenn mace] [--dtypes float32 float64] [--repeat 5]
                            [--warmup 3] [--threads 2] [--json bench.json] [--tiny] [--no-torch]
                            [--mace-model PATH] [--mace-python PYTHON] [--data DIR]

Models:
    sevenn   SevenNet-0 (the checkpoint bundled with sevenn) vs sevenn
    mace     a MACE-MP-0b3-medium-size model with random weights (mace's
             initialisation, seed 0, MACE-MP-0's 89 elements), built once per
             run by `tests/torch_ref/mace_reference.py` under --mace-python
             (or reused from --mace-model PATH), vs mace-torch; the Flax side
             converts the same file with `weights_convert.mace`

Rows (per model and dtype, medians of --repeat calls, or more until 1 s is
timed, after --warmup untimed ones):
    predict <frame>    energy+forces(+stress) of one frame, s (ours: the
                       library's `sparse_eqv.inference.Predictor.predict_graph`
                       on the frame's padded graph; torch: the model in eval
                       mode on the same frame, graph built once)
    train step         one optimiser step on a batch of 4 Cu frames, s
                       (ours: the STR step of `sparse_eqv.finetune.loop.Trainer`,
                       loss weights E 1 / F 100 / S 1, clip 10; torch, full
                       fine-tuning with Adam over every parameter: sevenn's model
                       in train mode, energy+forces MSE; mace: mace's own
                       `mace.tools.train.take_step` with
                       `WeightedEnergyForcesStressLoss(1, 100, 1)`, clip 10, on a
                       batch from mace's data pipeline)
    first compile      s, JAX only: time JAX reports compiling (tracing, lowering,
                       XLA) during the row's calls, i.e. in the first one
    compiles / epoch   jit compilations of the train step over one epoch of
                       mixed-size frames (= distinct padding budgets; torch: 0)
    peak RSS           MiB of the worker process (resource.getrusage)

Every (model, backend, dtype) runs in its own worker process (this file re-run
with --worker; mace-torch's under --mace-python, where mace-torch and e3nn
0.4.4 live), one after the other, so peak RSS is per process and JAX and torch
see the same machine state within a run. Both get --threads threads
(XLA_FLAGS / torch.set_num_threads). After each table, the largest energy
difference between the two sides over the predicted frames (eV) checks that
both ran the same model.

Frames are read from --data: by default the full reference data in
../shared/data (a sibling of the repository), or, with --tiny, the small
real-frame fixtures in tests/data (the same file names, a few frames each;
tests/data/README.md), so that the CI mode runs in a fresh clone.

--tiny is the CI mode: one aspirin frame, a batch of 2, one warm-up, one repeat. SevenNet:
a tiny random SevenNet-shaped Flax model, while torch still runs SevenNet-0
(both code paths run, the ratios mean nothing). MACE: a small mace-torch model
with the MACE-MP-0b3 block types (reduced channels, max_ell 1, correlation 2,
elements H C O) on both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # the full runs' default
TINY_DATA = REPO / "tests" / "data"  # --tiny's default: aspirin frames 0-4 are there
FRAMES = {
    "aspirin (21 at.)": ("rmd17/rmd17_aspirin_test_01.npz", 0),
    "Cu fcc (108 at.)": ("cu/mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz", 0),
    "LiGePS (400 at.)": ("sse-pbe/LiGePS-iter.000004-data.004", 0),
}
TINY_FRAME = "aspirin (21 at.)"
TRAIN_FRAMES = "cu/mlearn_Cu_test.json"  # 107-atom Cu cells; the batch is its first frames
EPOCH_FILES = ("cu/mlearn_Cu_test.json", "cu/mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz")
CHECKPOINT = "7net-0"
MODELS = ("sevenn", "mace")
TITLES = {
    ("sevenn", False): "SevenNet-0 (real weights)",
    ("sevenn", True): "SevenNet (tiny random model for JAX, SevenNet-0 for torch)",
    ("mace", False): "MACE (MACE-MP-0b3-medium size, random weights)",
    ("mace", True): "MACE (tiny, random weights)",
}
MACE_PYTHON = REPO / ".venv-mace" / "bin" / "python"
MACE_ARCH = "mp0b3-medium"  # in tests/torch_ref/mace_reference.py
MACE_ELEMENTS = list(range(1, 84)) + list(range(89, 95))  # MACE-MP-0's 89: H-Bi, Ac-Pu
MACE_TINY = {"elements": [1, 6, 8], "max_ell": 1, "correlation": 2}  # plus mace_reference's REDUCED sizes
# Both sides' training loss and clipping (sparse_eqv's defaults; the mace worker cannot import them):
LOSS_WEIGHTS = (1.0, 100.0, 1.0)  # energy per atom, forces, stress (LossWeights)
CLIP_NORM = 10.0  # global gradient norm (TrainConfig.clip_norm)


# JAX's compile events (tracing, lowering to MLIR, XLA compilation), summed into "first compile"
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


MIN_TIMED_S = 1.0  # short calls are repeated until this much is timed: a 20-50 ms row's median of 2 moved 2x


def _timings(fn, repeat: int, warmup: int):
    """(median of the timed calls s, last return value): at least `repeat`
    calls, and more until MIN_TIMED_S seconds are timed (at most 100).

    The timed calls follow `warmup` (>= 1) untimed ones: JAX compiles in the
    first, and TorchScript'ed e3nn modules (in mace-torch and sevenn) profile
    and optimise their graphs over the first 2-3 calls (3.6, 3.8, 2.4 s, then
    0.1-0.3 s per call for a small MACE here).
    """
    for _ in range(warmup):
        value = fn()
    times: list[float] = []
    while len(times) < repeat or (sum(times) < MIN_TIMED_S and len(times) < 100):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def _emit(out: dict) -> None:
    """Print the worker's results so far as one JSON line (the driver keeps the
    last line, so rows measured before a crash, e.g. out of memory, survive)."""
    print(json.dumps(out), flush=True)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _data(args) -> Path:
    """The directory the frames are read from: --data, else DATA, or TINY_DATA with --tiny.
    (scripts/profile_ops.py and probe_calls.py pass a namespace without `data`.)"""
    data = getattr(args, "data", None)
    return Path(data) if data else TINY_DATA if args.tiny else DATA


def _frame_names(args) -> list[str]:
    return [TINY_FRAME] if args.tiny else list(FRAMES)


def _frames(args):
    from sparse_eqv.data.readers import read_frames

    return {name: read_frames(_data(args) / FRAMES[name][0])[FRAMES[name][1]] for name in _frame_names(args)}


def _train_dataset(args):
    """The fine-tuning set the training batch is drawn from (its padding budgets are capped by it)."""
    from sparse_eqv.data.readers import read_frames

    return read_frames(_data(args) / (FRAMES[TINY_FRAME][0] if args.tiny else TRAIN_FRAMES))


def _train_batch_size(args) -> int:
    """The training batch: the first frames of `_train_dataset`."""
    return 2 if args.tiny else 4


def _train_frames(args):
    return _train_dataset(args)[: _train_batch_size(args)]


def tiny_config() -> dict:
    """A one-layer SevenNet-shaped config small enough for CI (random weights)."""
    last = {
        "gate": {"scalars": "8x0e", "act_scalars": ["silu"], "gates": "", "act_gates": [], "gated": ""},
        "radial": {"hidden": [4, 8], "kind": "e3nn", "act": "silu"},
        "self_connection": "linear", "sort_instructions": True,
    }
    return {
        "model": "sevenn", "atomic_numbers": [1, 6, 8], "r_max": 4.0, "dtype": "float64",
        "embedding": {"features": 8, "scale": 1.0, "node_attrs": "one_hot"},
        "radial_basis": {"num_basis": 4, "cutoff": "xplor", "cutoff_arg": 3.5},
        "irreps_sh": "1x0e+1x1e", "sh_normalize": True,
        "layers": [dict(last, irreps_in="8x0e")],
        "readout": {"dims": [8, 4, 1], "kind": "linear", "act": None},
    }


# ----------------------------------------------------------------- JAX side


def _jax_model(args) -> tuple[dict, dict]:
    """(config, variables) of the Flax model in args.dtype."""
    import jax
    import jax.numpy as jnp

    if args.model == "mace":
        from weights_convert.mace import convert

        return convert(args.mace_file, dtype=args.dtype)
    if not args.tiny:
        from weights_convert.sevenn import convert

        return convert(CHECKPOINT, dtype=args.dtype)
    from sparse_eqv.models import build_model

    config = dict(tiny_config(), dtype=args.dtype)
    z = jnp.zeros((2, 3), args.dtype)
    variables = build_model(config).init(jax.random.PRNGKey(0), z + jnp.asarray([0.0, 0.0, 1.0], args.dtype),
                                         jnp.zeros(2, jnp.int32), jnp.asarray([0, 1]), jnp.asarray([1, 0]))
    return config, variables


def jax_predictor(args) -> tuple[dict, object]:
    """(config, Predictor) of args.model in args.dtype, JAX configured as for every JAX row.

    The Predictor is what `sparse-eqv predict` and the ASE calculator run.
    """
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    from sparse_eqv.inference import Predictor

    config, variables = _jax_model(args)
    return config, Predictor(config, variables)


def str_trainer(args, config: dict, predictor, dataset) -> tuple:
    """(Trainer, its RunsState, batch) of the "train step" row: STR on the first `_train_batch_size` frames
    of `dataset` as one batch, one device, budgets bounded by `dataset` as `sparse-eqv finetune` bounds them."""
    import jax.numpy as jnp

    from sparse_eqv.finetune import STR
    from sparse_eqv.finetune.loop import Trainer, TrainConfig
    from sparse_eqv.finetune.losses import LossWeights
    from sparse_eqv.finetune.targets import select_targets

    graphs = [predictor.graph(f) for f in dataset]
    size = _train_batch_size(args)
    params = predictor.variables["params"]
    trainer = Trainer(
        predictor.module, predictor.variables["constants"], STR(select_targets(params, config, ["default"])), params,
        TrainConfig(batch_size=size, clip_norm=CLIP_NORM, weights=LossWeights(*LOSS_WEIGHTS)),
        n_devices=1, dtype=jnp.dtype(args.dtype), cutoff=predictor.cutoff,
    )
    trainer.fit_budgets(graphs)
    batch, _ = trainer.stack(graphs, list(range(size)))
    return trainer, trainer.initial_state(), batch


def _jax_worker(args) -> dict:
    config, predictor = jax_predictor(args)
    import jax
    from jax import monitoring

    out: dict = {"model": args.model, "backend": "jax", "version": f"jax {jax.__version__}", "dtype": args.dtype,
                 "predict_s": {}, "compile_s": {}, "energy_ev": {}}
    compile_events: list[float] = []
    monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compile_events.append(seconds) if event in COMPILE_EVENTS else None
    )

    def timings_and_compile(fn):
        """_timings(fn) and the seconds JAX spent compiling during those calls."""
        compile_events.clear()
        median, value = _timings(fn, args.repeat, args.warmup)
        return median, value, sum(compile_events)

    for name, frame in _frames(args).items():
        graph = predictor.batch([predictor.graph(frame)])
        median, result, out["compile_s"][f"predict {name}"] = timings_and_compile(lambda: predictor.predict_graph(graph))
        out["predict_s"][name] = median
        out["energy_ev"][name] = float(result["energy"][0])
    _emit(out)

    dataset = _train_dataset(args)
    trainer, state, batch = str_trainer(args, config, predictor, dataset)
    out["train_budget"] = dataclasses.asdict(next(iter(trainer.budgets)))
    out["train_step_s"], _, out["compile_s"]["train step"] = timings_and_compile(lambda: trainer.train_step(state, batch))
    out["train_atoms"] = sum(len(f.numbers) for f in dataset[: _train_batch_size(args)])
    out["compiles_per_epoch"] = _epoch_compiles(args, predictor, trainer)
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _epoch_compiles(args, predictor, trainer) -> dict:
    """Train-step compilations over one epoch of mixed-size frames.

    jit compiles the step once per input shape, i.e. once per padding budget
    (`GraphBudget`): the batches of one epoch are stacked as the trainer
    stacks them and their distinct budgets counted. Running them would add
    one compile per budget (minutes each for SevenNet-0 here).
    """
    from sparse_eqv.data.readers import read_frames

    if args.tiny:
        frames = read_frames(_data(args) / FRAMES[TINY_FRAME][0])[:5]
        cut = frames[1]
        frames[1] = dataclasses.replace(cut, numbers=cut.numbers[:13], positions=cut.positions[:13], forces=cut.forces[:13])
    else:
        frames = [f for path in EPOCH_FILES for f in read_frames(_data(args) / path)]
    graphs = [predictor.graph(f) for f in frames]
    seen, largest = set(trainer.budgets), trainer.largest_budget
    trainer.budgets.clear()
    trainer.fit_budgets(graphs)
    for indices in trainer.epoch_batches(len(graphs), 0):
        trainer.stack(graphs, indices)
    budgets = set(trainer.budgets)
    trainer.budgets |= seen
    trainer.largest_budget = largest
    return {"frames": len(frames), "sizes": sorted({len(f.numbers) for f in frames}), "batches": -(-len(frames) // trainer.config.batch_size),
            "compilations": len(budgets)}


# --------------------------------------------------------------- torch side


def _torch_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import sevenn
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.checkpoint import SevenNetCheckpoint
    from sevenn.train.dataload import unlabeled_atoms_to_graph
    from torch_geometric.data import Batch

    from weights_convert.sevenn import resolve_bundled

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    checkpoint = SevenNetCheckpoint(str(resolve_bundled(CHECKPOINT)))
    cutoff = checkpoint.config[KEY.CUTOFF]

    def cast_inputs(module, inputs):  # sevenn creates some float32 tensors internally
        data = inputs[0]
        if dtype == torch.float64 and hasattr(data, "keys"):
            for key in list(data.keys()):
                value = data[key]
                if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                    data[key] = value.double()

    def build(batched: bool):
        model = checkpoint.build_model()
        model.set_is_batch_data(batched)
        model.to(dtype)
        for module in model.modules():
            module.register_forward_pre_hook(cast_inputs)
        return model

    def data_of(frame):
        tensors = {}
        for key, value in unlabeled_atoms_to_graph(frame.to_atoms(), cutoff).items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
                value = value.to(dtype) if value.dtype.is_floating_point else value.long()
            tensors[key] = value
        return AtomGraphData(**tensors)

    out: dict = {"model": "sevenn", "backend": "torch", "version": f"torch {torch.__version__}, sevenn {sevenn.__version__}",
                 "dtype": args.dtype, "predict_s": {}, "energy_ev": {}}
    model = build(batched=False)
    model.eval()
    for name, frame in _frames(args).items():
        data = data_of(frame)
        out["predict_s"][name], result = _timings(lambda: model(data.clone()), args.repeat, args.warmup)
        out["energy_ev"][name] = float(result[KEY.PRED_TOTAL_ENERGY].detach())
    _emit(out)

    frames = _train_frames(args)
    model = build(batched=True)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    samples = [data_of(f) for f in frames]
    energy = torch.tensor([f.energy for f in frames], dtype=dtype)
    forces = torch.from_numpy(np.concatenate([f.forces for f in frames])).to(dtype)
    n_atoms = torch.tensor([len(f.numbers) for f in frames], dtype=dtype)

    def step():
        batch = Batch.from_data_list([s.clone() for s in samples])
        result = model(batch)
        loss = (((result[KEY.PRED_TOTAL_ENERGY] - energy) / n_atoms) ** 2).mean()
        loss = loss + ((result[KEY.PRED_FORCE] - forces) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    out["train_step_s"] = _timings(step, args.repeat, args.warmup)[0]
    out["compiles_per_epoch"] = {"compilations": 0}
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _write_mace_inputs(args, directory: Path) -> None:
    """The frames for the mace-torch worker (whose environment cannot import
    sparse_eqv's readers) as extxyz: predict.extxyz (the predicted frames in
    `_frame_names` order) and train.extxyz with labels under mace's REF_ keys
    (energy eV, forces eV/Å, stress eV/Å^3, ASE sign)."""
    import ase.io

    ase.io.write(directory / "predict.extxyz", [f.to_atoms() for f in _frames(args).values()], format="extxyz")
    images = []
    for frame in _train_frames(args):
        atoms = frame.to_atoms()
        atoms.info["REF_energy"] = frame.energy
        atoms.arrays["REF_forces"] = frame.forces
        if frame.stress is not None:
            atoms.info["REF_stress"] = frame.stress
        images.append(atoms)
    ase.io.write(directory / "train.extxyz", images, format="extxyz")


def _mace_build_worker(args) -> dict:
    """Write the benchmark's mace-torch model to args.mace_file (run under
    --mace-python): `mace_reference`'s MACE-MP-0b3-medium architecture, seed 0,
    with MACE-MP-0's 89 elements (full size) or MACE_TINY (reduced sizes)."""
    spec = importlib.util.spec_from_file_location("mace_reference", REPO / "tests" / "torch_ref" / "mace_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    name = f"bench-{MACE_ARCH}"  # registered in this process only
    reference.ARCHITECTURES[name] = dict(reference.ARCHITECTURES[MACE_ARCH], **(MACE_TINY if args.tiny else {"elements": MACE_ELEMENTS}))
    reference._memoize_u_matrices()
    reference.run(name, 0, args.mace_file, full_size=not args.tiny)
    return {"model": args.mace_file}


def _mace_torch_worker(args) -> dict:
    """mace-torch's predict and training step (run under --mace-python).

    Graphs and batches come from mace's own pipeline (`config_from_atoms`,
    `AtomicData.from_config`, its DataLoader) and the model is called as in
    `scripts/time_predict.py` (and mace's calculator); the step is mace's
    `take_step`.
    """
    import ase.io
    import e3nn
    import mace
    import torch
    from mace import data as mace_data
    from mace.modules.loss import WeightedEnergyForcesLoss, WeightedEnergyForcesStressLoss
    from mace.tools import torch_geometric, utils
    from mace.tools.train import take_step

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    torch.set_default_dtype(dtype)  # mace builds input tensors and loss buffers in it
    model = torch.load(args.mace_file, map_location="cpu", weights_only=False).to(dtype)
    heads = list(getattr(model, "heads", ["Default"]))
    keys = mace_data.KeySpecification(info_keys={"energy": "REF_energy", "stress": "REF_stress"},
                                      arrays_keys={"forces": "REF_forces"})
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])

    def batch_of(atoms_list):
        graphs = [
            mace_data.AtomicData.from_config(mace_data.config_from_atoms(atoms, key_specification=keys, head_name=heads[0]),
                                             z_table=z_table, cutoff=float(model.r_max), heads=heads)
            for atoms in atoms_list
        ]
        return next(iter(torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)))

    out: dict = {"model": "mace", "backend": "torch", "dtype": args.dtype, "predict_s": {}, "energy_ev": {},
                 "version": f"torch {torch.__version__}, mace-torch {mace.__version__}, e3nn {e3nn.__version__}"}
    directory = Path(args.frames_dir)
    model.eval()
    for name, atoms in zip(_frame_names(args), ase.io.read(directory / "predict.extxyz", index=":")):
        batch = batch_of([atoms])
        out["predict_s"][name], result = _timings(
            lambda: model(batch.to_dict(), compute_stress=True, training=False), args.repeat, args.warmup
        )
        out["energy_ev"][name] = float(result["energy"][0].detach())
    _emit(out)

    model.train()
    atoms_list = ase.io.read(directory / "train.extxyz", index=":")
    batch = batch_of(atoms_list)
    stress = all(atoms.pbc.all() for atoms in atoms_list)  # a molecule's stress is 0/0 in mace
    energy_w, forces_w, stress_w = LOSS_WEIGHTS
    loss = (WeightedEnergyForcesStressLoss(energy_w, forces_w, stress_w) if stress
            else WeightedEnergyForcesLoss(energy_w, forces_w))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    output_args = {"forces": True, "virials": False, "stress": stress}
    out["train_step_s"] = _timings(
        lambda: take_step(model, loss, batch, optimizer, None, output_args, CLIP_NORM, torch.device("cpu")),
        args.repeat, args.warmup,
    )[0]
    out["compiles_per_epoch"] = {"compilations": 0}
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


# ------------------------------------------------------------------- driver


def _run_worker(args, worker: str, model: str, dtype: str, workdir: Path) -> dict:
    """Run this file as one worker process and return its last JSON line (plus
    wall_s). A measuring worker that fails keeps the rows it printed before,
    with "error" set; a failed build raises."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    python = sys.executable
    if model == "mace" and worker in ("torch", "build"):
        python = str(args.mace_python)
        env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    cmd = [python, __file__, "--worker", worker, "--model", model, "--dtype", dtype, "--repeat", str(args.repeat),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--mace-file", str(args.mace_file), "--frames-dir", str(workdir)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--data", str(args.data)] if args.data else []
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        if worker == "build":
            raise RuntimeError(f"{model} build worker failed:\n{proc.stderr[-4000:]}")
        reason = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        print(f"{model} {worker} {dtype} worker failed ({reason}); its later rows are missing:\n{proc.stderr[-2000:]}",
              file=sys.stderr, flush=True)
    result = json.loads(lines[-1]) if lines else {"model": model, "backend": worker, "dtype": dtype}
    if proc.returncode != 0:
        result["error"] = reason
    result["wall_s"] = time.perf_counter() - start
    return result


def table(results: list[dict]) -> str:
    """One text table for one model: rows x (dtype: jax, torch, jax/torch)."""
    dtypes = sorted({r["dtype"] for r in results}, reverse=True)
    by = {(r["backend"], r["dtype"]): r for r in results}
    rows: list[tuple[str, str, callable]] = []
    names = [n for n in FRAMES if any(n in r.get("predict_s", {}) for r in results)]
    for n in names:
        rows.append((f"predict {n} [s]", n, lambda r, n=n: r.get("predict_s", {}).get(n)))
    rows.append(("train step, batch [s]", "", lambda r: r.get("train_step_s")))
    rows.append(("first compile, train [s]", "", lambda r: r.get("compile_s", {}).get("train step")))
    rows.append(("first compile, predict max [s]", "", lambda r: max((v for k, v in r.get("compile_s", {}).items() if k.startswith("predict")), default=None)))
    rows.append(("compiles / epoch", "", lambda r: r.get("compiles_per_epoch", {}).get("compilations")))
    rows.append(("peak RSS [MiB]", "", lambda r: r.get("peak_rss_mib")))

    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    header = f"{'row':34s}" + "".join(f"{'jax ' + d:>14s}{'torch ' + d:>14s}{'ratio':>8s}" for d in dtypes)
    lines = [header, "-" * len(header)]
    for label, _, get in rows:
        line = f"{label:34s}"
        for d in dtypes:
            j = get(by[("jax", d)]) if ("jax", d) in by else None
            t = get(by[("torch", d)]) if ("torch", d) in by else None
            ratio = f"{j / t:.2f}" if isinstance(j, float) and isinstance(t, float) and t > 0 else "-"
            line += f"{fmt(j):>14s}{fmt(t):>14s}{ratio:>8s}"
        lines.append(line)
    return "\n".join(lines)


def energy_differences(results: list[dict]) -> dict[str, float]:
    """Per dtype: max over the frames both sides predicted of |E_jax - E_torch|, eV."""
    by = {(r["backend"], r["dtype"]): r.get("energy_ev", {}) for r in results}
    out = {}
    for (backend, dtype), energy in by.items():
        other = by.get(("torch", dtype), {})
        common = [name for name in energy if name in other]
        if backend == "jax" and common:
            out[dtype] = max(abs(energy[name] - other[name]) for name in common)
    return out


def _bench_model(args, model: str, workdir: Path) -> tuple[list[dict], str, dict[str, float]]:
    """Every worker of one model; prints each result line, the table and the
    energy check. Returns the results, the table and the energy differences."""
    if model == "mace":
        if not args.mace_file.exists():
            _run_worker(args, "build", "mace", "float64", workdir)
        if not args.no_torch:
            _write_mace_inputs(args, workdir)
    results = []
    for dtype in args.dtypes:
        for backend in ["jax"] + ([] if args.no_torch else ["torch"]):
            results.append(_run_worker(args, backend, model, dtype, workdir))
            print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(f"{TITLES[(model, args.tiny)]}, {args.threads} threads, medians of >= {args.repeat} calls (>= {MIN_TIMED_S:g} s timed) after {args.warmup} warm-up calls; "
          "ratio = jax/torch (< 1: jax faster)")
    print(text)
    # tiny SevenNet: different models on the two sides, nothing to compare
    differences = {} if args.tiny and model == "sevenn" else energy_differences(results)
    for dtype, diff in differences.items():
        print(f"max |E_jax - E_torch| over the predicted frames, {dtype}: {diff:.2e} eV")
    for r in results:
        if "error" in r:
            print(f"{r['backend']} {r['dtype']}: worker failed ({r['error']}), rows after its last report missing")
    return results, text, differences


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=5, help="timed calls per row (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before them (the first compiles)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--mace-model", type=Path, help="MACE .model to use, built here first if missing (default: a temporary one)")
    p.add_argument("--mace-python", type=Path, default=MACE_PYTHON, help="interpreter with mace-torch (default .venv-mace)")
    p.add_argument("--data", type=Path, help="directory of the reference data, laid out as ../shared/data "
                   "(default: ../shared/data; with --tiny: the fixtures in tests/data)")
    p.add_argument("--worker", choices=["jax", "torch", "build"], help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, default="sevenn", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    p.add_argument("--mace-file", help=argparse.SUPPRESS)
    p.add_argument("--frames-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.repeat, args.warmup = 1, 1
    if args.worker:
        workers = {("jax", "sevenn"): _jax_worker, ("jax", "mace"): _jax_worker, ("torch", "sevenn"): _torch_worker,
                   ("torch", "mace"): _mace_torch_worker, ("build", "mace"): _mace_build_worker}
        print(json.dumps(workers[(args.worker, args.model)](args)))
        return 0
    report: dict = {"threads": args.threads, "tiny": args.tiny, "repeat": args.repeat, "results": [], "tables": {},
                    "energy_diff_ev": {}}
    with tempfile.TemporaryDirectory() as tmp:
        args.mace_file = args.mace_model or Path(tmp) / "mace.model"
        for model in args.models:
            workdir = Path(tmp) / model
            workdir.mkdir()
            results, report["tables"][model], report["energy_diff_ev"][model] = _bench_model(args, model, workdir)
            report["results"] += results
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
