"""Where one JAX step spends its time, op by op: a jax.profiler trace joined with XLA's optimised HLO.

    python scripts/profile_ops.py {sevenn,mace} [--row train|predict] [--dtype float32] [--top 30]
                                  [--frame PREFIX] [--mace-model PATH] [--tiny] [--json ops.json]

The row is set up exactly as in scripts/bench.py (same model, frames, batch,
STR trainer). It runs once to compile and warm up, then once under
`jax.profiler.trace`. Every XLA:CPU thunk of that call is matched to its
instruction in the optimised HLO (dumped with --xla_dump_to) and the
durations are summed twice: by op kind (dot, scatter, each fusion kind) and
by kind plus output shape (dots also by their contracting dimensions). On CPU
the thunks run on XLA's intra-op threads, so the summed op time can exceed
the call's wall time. predict profiles the bench frame whose name starts
with --frame (default: the 108-atom Cu frame).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path



def _bench():
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).with_name("bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hlo_instructions(dump_dir: Path) -> dict[tuple[str, str], str]:
    """(module name, instruction name) -> its HLO text, from the optimised modules in dump_dir."""
    out = {}
    for path in dump_dir.glob("*after_optimizations.txt"):
        text = path.read_text(errors="replace")
        module = re.search(r"HloModule ([\w.\-]+)", text).group(1)
        for line in text.splitlines():
            match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
            if match:
                out.setdefault((module, match.group(1)), match.group(2))
    return out


def op_key(name: str, text: str) -> tuple[str, str]:
    """(kind, kind + output shape [+ contracting dims for dots]) of one instruction."""
    kind = re.sub(r"\.\d+$", "", name)
    shape = text.split(" ", 1)[0]
    if kind == "dot":
        dims = re.findall(r"(lhs_contracting_dims=\{[\d,]*\}|rhs_contracting_dims=\{[\d,]*\})", text)
        return kind, f"dot {shape} {' '.join(dims)}"
    return kind, f"{kind} {shape}"


def op_times(trace_dir: Path, instructions: dict[tuple[str, str], str]) -> tuple[dict, dict]:
    """Summed thunk durations in ms (by kind, by kind + shape), each with a count."""
    trace = json.load(gzip.open(next(trace_dir.glob("**/*.trace.json.gz"))))
    by_kind: dict = collections.defaultdict(lambda: [0.0, 0])
    by_shape: dict = collections.defaultdict(lambda: [0.0, 0])
    for event in trace["traceEvents"]:
        args = event.get("args", {})
        text = instructions.get((args.get("hlo_module"), args.get("hlo_op")))
        if event.get("ph") != "X" or text is None:
            continue
        kind, shape = op_key(args["hlo_op"], text)
        for table, key in ((by_kind, kind), (by_shape, shape)):
            table[key][0] += event["dur"] / 1e3
            table[key][1] += 1
    return dict(by_kind), dict(by_shape)


def print_table(title: str, rows: dict, top: int) -> None:
    total = sum(ms for ms, _ in rows.values())
    print(f"\n{title} (ops summed: {total:.0f} ms)")
    print(f"{'ms':>9} {'share':>6} {'count':>6}  op")
    for key, (ms, count) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{ms:9.1f} {100 * ms / total:5.1f}% {count:6d}  {key}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=("sevenn", "mace"))
    p.add_argument("--row", choices=("train", "predict"), default="train")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--frame", default="Cu", help="predict: prefix of the bench frame's name")
    p.add_argument("--mace-model", type=Path, help="MACE .model (as scripts/bench.py --mace-model); required for mace")
    p.add_argument("--tiny", action="store_true", help="bench.py's CI-sized model and frames")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.model == "mace" and args.mace_model is None:
        p.error("mace needs --mace-model (build one with scripts/bench.py --models mace --mace-model PATH)")
    dump_dir = Path(tempfile.mkdtemp(prefix="profile_ops_"))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text".strip()
    import jax

    bench = _bench()
    setup = argparse.Namespace(model=args.model, tiny=args.tiny, dtype=args.dtype, mace_file=args.mace_model)
    config, predictor = bench.jax_predictor(setup)
    if args.row == "predict":
        frames = bench._frames(setup)
        frame = frames[bench.TINY_FRAME] if args.tiny else next(f for n, f in frames.items() if n.startswith(args.frame))
        graph = predictor.batch([predictor.graph(frame)])
        step = lambda: jax.block_until_ready(predictor.predict_graph(graph))  # noqa: E731
    else:
        trainer, state, batch = bench.str_trainer(setup, config, predictor, bench._train_dataset(setup))
        step = lambda: trainer.train_step(state, batch)  # noqa: E731
    step()
    step()
    trace_dir = dump_dir / "trace"
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    by_kind, by_shape = op_times(trace_dir, hlo_instructions(dump_dir))
    print(f"{args.model} {args.row} {args.dtype}: wall {wall:.2f} s under the profiler (HLO and trace in {dump_dir})")
    print_table("by op kind", by_kind, args.top)
    print_table("by op kind and output shape", by_shape, args.top)
    if args.json:
        args.json.write_text(json.dumps({"wall_s": wall, "by_kind_ms": by_kind, "by_shape_ms": by_shape}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
