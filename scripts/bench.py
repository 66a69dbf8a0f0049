"""Side-by-side benchmark: converted Flax models vs the official torch packages (issue 7).

    python scripts/bench.py [--dtypes float32 float64] [--repeat 5] [--threads 2]
                            [--json bench.json] [--tiny] [--no-torch]

Rows (per dtype, medians over --repeat after one warm-up call):
    predict <frame>    energy+forces(+stress) of one frame, s
    train step         one optimiser step on a batch of 4 Cu frames, s
                       (ours: the STR step of `sparse_eqv.finetune.loop.Trainer`;
                       torch: sevenn's model in train mode, energy+forces MSE,
                       torch.optim.Adam over every parameter: full fine-tuning)
    first compile      s, JAX only (the first call of each jitted function)
    compiles / epoch   jit compilations of the train step over one epoch of
                       mixed-size frames (= distinct padding budgets; torch: 0)
    peak RSS           MiB of the worker process (resource.getrusage)

Every (backend, dtype) runs in its own worker process (this file re-run
with --worker), one after the other, so peak RSS is per process and JAX and
torch see the same machine state within a run. Both get --threads threads
(XLA_FLAGS / torch.set_num_threads).

--tiny is the CI mode: a tiny random SevenNet-shaped Flax model, one
aspirin frame, a batch of 2, one repeat; torch still runs SevenNet-0 on
that frame, so both code paths are exercised but the ratios mean nothing.

MACE rows (MACE-MP-0b3-medium size, mace-torch in .venv-mace, converted with
`weights_convert.mace`) plug in as another model in `MODELS`: a worker
`_jax_worker`-style function for the Flax side and a `.venv-mace/bin/python`
subprocess for the torch side (as `scripts/time_predict.py` does). Not yet
measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FRAMES = {
    "aspirin (21 at.)": ("rmd17/rmd17_aspirin_test_01.npz", 0),
    "Cu fcc (108 at.)": ("cu/mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz", 0),
    "LiGePS (400 at.)": ("sse-pbe/LiGePS-iter.000004-data.004", 0),
}
TRAIN_FRAMES = "cu/mlearn_Cu_test.json"  # 107-atom Cu cells; the batch is its first frames
EPOCH_FILES = ("cu/mlearn_Cu_test.json", "cu/mgcu_Cu_fcc_elastic_C44_strain_-0.010.extxyz")
CHECKPOINT = "7net-0"


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _frames(args):
    from sparse_eqv.data.readers import read_frames

    if args.tiny:
        return {"aspirin (21 at.)": read_frames(DATA / FRAMES["aspirin (21 at.)"][0])[0]}
    return {name: read_frames(DATA / path)[index] for name, (path, index) in FRAMES.items()}


def _train_frames(args):
    from sparse_eqv.data.readers import read_frames

    if args.tiny:
        return read_frames(DATA / FRAMES["aspirin (21 at.)"][0])[:2]
    return read_frames(DATA / TRAIN_FRAMES)[:4]


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


def _jax_worker(args) -> dict:
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp

    from sparse_eqv.data.graph import batch_graphs, frame_to_graph
    from sparse_eqv.finetune import STR
    from sparse_eqv.finetune.loop import Trainer, TrainConfig
    from sparse_eqv.finetune.targets import select_targets
    from sparse_eqv.models import build_model
    from sparse_eqv.potential import energy_forces_stress

    out: dict = {"backend": "jax", "version": jax.__version__, "dtype": args.dtype, "predict_s": {}, "compile_s": {}}
    if args.tiny:
        config = tiny_config()
        module = build_model(config)
        z = jnp.zeros((2, 3), args.dtype)
        variables = module.init(jax.random.PRNGKey(0), z + jnp.asarray([0.0, 0.0, 1.0], args.dtype),
                                jnp.zeros(2, jnp.int32), jnp.asarray([0, 1]), jnp.asarray([1, 0]))
        variables = jax.tree.map(lambda x: x.astype(args.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
    else:
        from weights_convert.sevenn import convert

        config, variables = convert(CHECKPOINT, dtype=args.dtype)
        module = build_model(config)
    config = {k: v for k, v in config.items() if k != "torch_names"}

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(args.dtype) if np.issubdtype(x.dtype, np.floating) else x, tree)

    predict = jax.jit(lambda v, g: energy_forces_stress(module.apply, v, g))
    for name, frame in _frames(args).items():
        graph = cast(batch_graphs([frame_to_graph(frame, config["atomic_numbers"], config["r_max"])]))
        start = time.perf_counter()
        compiled = predict.lower(variables, graph).compile()
        out["compile_s"][f"predict {name}"] = time.perf_counter() - start
        out["predict_s"][name] = _median_time(lambda: jax.block_until_ready(compiled(variables, graph)), args.repeat)

    frames = _train_frames(args)
    graphs = [frame_to_graph(f, config["atomic_numbers"], config["r_max"]) for f in frames]
    params = variables["params"]
    trainer = Trainer(
        module, variables["constants"], STR(select_targets(params, config, ["default"])), params,
        TrainConfig(batch_size=len(frames)), n_devices=1, dtype=jnp.dtype(args.dtype),
    )
    state = trainer.initial_state()
    batch, _ = trainer.stack(graphs, list(range(len(graphs))))
    start = time.perf_counter()
    trainer.train_step(state, batch)
    out["compile_s"]["train step"] = time.perf_counter() - start
    out["train_step_s"] = _median_time(lambda: trainer.train_step(state, batch), args.repeat)
    out["train_atoms"] = sum(len(f.numbers) for f in frames)
    out["compiles_per_epoch"] = _epoch_compiles(args, config, trainer)
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _epoch_compiles(args, config, trainer) -> dict:
    """Train-step compilations over one epoch of mixed-size frames.

    jit compiles the step once per input shape, i.e. once per padding budget
    (`GraphBudget`): the batches of one epoch are stacked as the trainer
    stacks them and their distinct budgets counted. Running them would add
    one compile per budget (minutes each for SevenNet-0 here).
    """
    from sparse_eqv.data.graph import frame_to_graph
    from sparse_eqv.data.readers import read_frames

    if args.tiny:
        frames = read_frames(DATA / FRAMES["aspirin (21 at.)"][0])[:5]
        cut = frames[1]
        frames[1] = dataclasses.replace(cut, numbers=cut.numbers[:13], positions=cut.positions[:13], forces=cut.forces[:13])
    else:
        frames = [f for path in EPOCH_FILES for f in read_frames(DATA / path)]
    graphs = [frame_to_graph(f, config["atomic_numbers"], config["r_max"]) for f in frames]
    seen = set(trainer.budgets)
    trainer.budgets.clear()
    for indices in trainer.epoch_batches(len(graphs), 0):
        trainer.stack(graphs, indices)
    budgets = set(trainer.budgets)
    trainer.budgets |= seen
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

    out: dict = {"backend": "torch", "version": f"torch {torch.__version__}, sevenn {sevenn.__version__}",
                 "dtype": args.dtype, "predict_s": {}}
    model = build(batched=False)
    model.eval()
    for name, frame in _frames(args).items():
        data = data_of(frame)
        out["predict_s"][name] = _median_time(lambda: model(data.clone())[KEY.PRED_FORCE].detach(), args.repeat)

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

    out["train_step_s"] = _median_time(step, args.repeat)
    out["compiles_per_epoch"] = {"compilations": 0}
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


# ------------------------------------------------------------------- driver


def _run_worker(args, backend: str, dtype: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=1").strip()
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, __file__, "--worker", backend, "--dtype", dtype, "--repeat", str(args.repeat),
           "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} {dtype} worker failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def table(results: list[dict]) -> str:
    """One text table: rows x (dtype: jax, torch, jax/torch)."""
    dtypes = sorted({r["dtype"] for r in results}, reverse=True)
    by = {(r["backend"], r["dtype"]): r for r in results}
    rows: list[tuple[str, str, callable]] = []
    names = [n for n in FRAMES if any(n in r["predict_s"] for r in results)]
    for n in names:
        rows.append((f"predict {n} [s]", n, lambda r, n=n: r["predict_s"].get(n)))
    rows.append(("train step, batch [s]", "", lambda r: r.get("train_step_s")))
    rows.append(("first compile, train [s]", "", lambda r: r.get("compile_s", {}).get("train step")))
    rows.append(("first compile, predict max [s]", "", lambda r: max((v for k, v in r.get("compile_s", {}).items() if k.startswith("predict")), default=None)))
    rows.append(("compiles / epoch", "", lambda r: r["compiles_per_epoch"].get("compilations", r["compiles_per_epoch"].get("budgets"))))
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.repeat = 1
    if args.worker:
        result = (_jax_worker if args.worker == "jax" else _torch_worker)(args)
        print(json.dumps(result))
        return 0
    results = []
    for dtype in args.dtypes:
        for backend in ["jax"] + ([] if args.no_torch else ["torch"]):
            results.append(_run_worker(args, backend, dtype))
            print(json.dumps(results[-1]), flush=True)
    text = table(results)
    print(f"SevenNet-0 ({'tiny random model for JAX' if args.tiny else 'real weights'}), {args.threads} threads, "
          f"medians of {args.repeat} after warm-up; ratio = jax/torch (< 1: jax faster)")
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "tiny": args.tiny, "results": results, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
