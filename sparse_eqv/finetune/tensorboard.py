"""`finetune --tensorboard`: the log.csv rows as TensorBoard scalars.

tensorboardX writes the event files: pure Python on numpy and protobuf (about
0.1 MB), where TensorBoard's own writer would pull in TensorFlow or torch's
`torch.utils.tensorboard`. It is an optional dependency (`pip install
tensorboardX`, or the `tensorboard` extra). View a run with
`tensorboard --logdir RUN_DIR/tensorboard` (TensorBoard itself installed anywhere).

Every numeric column of an epoch's row (losses, validation MAE/RMSE, lr,
layer sparsity and STR thresholds, s/epoch) becomes a scalar at the row's
optimiser step; a resumed run appends a new event file with the epochs it adds.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from sparse_eqv.errors import SparseEqvError

LOG_DIR = "tensorboard"
_SKIP = ("epoch", "step", "compiles")  # the x axis, and a count that is no curve


def require() -> None:
    """SparseEqvError naming the package when tensorboardX is not installed (checked before
    a run directory is made)."""
    try:
        importlib.import_module("tensorboardX")
    except ImportError:
        raise SparseEqvError("--tensorboard needs the tensorboardX package: pip install tensorboardX") from None


def open_writer(run_dir: Path):
    """A tensorboardX SummaryWriter on RUN_DIR/tensorboard."""
    require()
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(run_dir / LOG_DIR))


def write_row(writer, row: dict[str, Any]) -> None:
    """One log.csv row as scalars `<column>` at step row["step"]; None and NaN are left out."""
    for name, value in row.items():
        if name in _SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if math.isfinite(value):
            writer.add_scalar(name, float(value), global_step=int(row["step"]))
    writer.flush()
