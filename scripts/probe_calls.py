"""CPU, system time and page faults of single JAX calls, and RSS step by step: what the allocator costs.

    python scripts/probe_calls.py {sevenn,mace} [--dtype float32] [--frames Cu LiGePS] [--calls 7]
                                  [--train-steps 5] [--mace-model PATH] [--tiny]

The model and frames are set up exactly as in scripts/bench.py. For each
frame whose name starts with one of --frames: 3 untimed predictions, then the
medians over --calls predictions of wall, user and system seconds and minor
page faults (`resource.getrusage` of the process, all threads). Then
--train-steps STR training steps on the bench batch (the first compiles),
each with its wall, user and system seconds, faults, current and peak RSS.
Run it under `LD_PRELOAD=...` to compare allocators (docs/performance.md,
"Tried, not kept"). --tiny is bench.py's CI mode (tiny model, aspirin).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

from profile_ops import _bench


def usage() -> tuple[float, float, int]:
    """(user s, system s, minor faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def resident_mib() -> float:
    """Current resident set size [MiB]."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def measured(call) -> tuple[float, float, float, int]:
    """(wall s, user s, system s, minor faults) of one call."""
    user0, sys0, faults0 = usage()
    start = time.perf_counter()
    call()
    wall = time.perf_counter() - start
    user1, sys1, faults1 = usage()
    return wall, user1 - user0, sys1 - sys0, faults1 - faults0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["sevenn", "mace"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--frames", nargs="+", default=["Cu", "LiGePS"], help="prefixes of bench frame names")
    p.add_argument("--calls", type=int, default=7)
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--mace-model", type=Path, default=Path("/tmp/mace.model"),
                   help="an existing MACE .model, e.g. the one `scripts/bench.py --mace-model PATH` built")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)
    bench = _bench()
    import jax

    args = argparse.Namespace(model=a.model, dtype=a.dtype, tiny=a.tiny, mace_file=str(a.mace_model))
    config, predictor = bench.jax_predictor(args)
    for name, frame in bench._frames(args).items():
        if not any(name.startswith(prefix) for prefix in a.frames):
            continue

        def predict():
            jax.block_until_ready(predictor.predict([frame]))

        for _ in range(3):
            predict()
        wall, user, system, faults = (statistics.median(c) for c in zip(*(measured(predict) for _ in range(a.calls))))
        print(f"predict {name:18s} wall {wall:.3f} user {user:.3f} sys {system:.3f} s  faults {faults:.0f}"
              f"  rss {resident_mib():.0f} MiB", flush=True)
    if a.train_steps:
        trainer, state, batch = bench.str_trainer(args, config, predictor, bench._train_dataset(args))
        for step in range(a.train_steps):
            wall, user, system, faults = measured(lambda: trainer.train_step(state, batch))
            print(f"train step {step} wall {wall:.2f} user {user:.2f} sys {system:.2f} s  faults {faults}"
                  f"  rss {resident_mib():.0f} MiB  peak {bench._peak_rss_mib():.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
