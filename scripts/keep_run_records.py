"""Copy the small records of a results table's finished runs into the repository
(docs/runs/<set>/<row>/: metrics.json, log.csv, run.json, sparsity.json, plus the
table's table.md/table.json and robustness.md/.json), so that the numbers in
docs/results.md and its figures can be checked and redrawn without the runs'
checkpoints (`sparse-eqv curves docs/runs/<set>/<row> ...` reads log.csv).

    .venv/bin/python scripts/keep_run_records.py runs/conv/aspirin docs/runs/aspirin
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

RUN_FILES = ("metrics.json", "log.csv", "run.json", "sparsity.json", "train.log")
TABLE_FILES = ("table.md", "table.json", "robustness.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table_dir", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    kept = 0
    for run in sorted((args.table_dir / "runs").glob("*")):
        if not (run / "metrics.json").exists():
            continue  # not finished
        target = args.dest / run.name
        target.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (run / name).exists():
                shutil.copy2(run / name, target / name)
        kept += 1
    for name in TABLE_FILES:
        if (args.table_dir / name).exists():
            shutil.copy2(args.table_dir / name, args.dest / name)
    print(f"kept the records of {kept} finished run(s) in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
