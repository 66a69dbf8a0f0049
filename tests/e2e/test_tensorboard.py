"""`finetune --tensorboard`: every numeric log.csv column as a TensorBoard scalar at its step."""

from __future__ import annotations

import csv
import struct
import sys

import numpy as np
import pytest

from sparse_eqv.cli import main
from sparse_eqv.finetune.tensorboard import LOG_DIR
from sparse_eqv.testing import write_labelled_frames, write_tiny_model

pytest.importorskip("tensorboardX")


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TFRecord event files in `log_dir` (length, CRC, Event proto, CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_scalars_are_the_log_rows(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    train = write_labelled_frames(tmp_path / "train.xyz", 8, seed=0)
    valid = write_labelled_frames(tmp_path / "valid.xyz", 2, seed=1)
    run = tmp_path / "run"
    assert main(["finetune", str(model), "--train", str(train), "--valid", str(valid), "--epochs", "2",
                 "--batch-size", "4", "--threshold-decay", "0.3", "--tensorboard", "--quiet", "-o", str(run)]) == 0
    rows = list(csv.DictReader((run / "log.csv").open()))
    scalars = read_scalars(run / LOG_DIR)
    assert {"train_loss", "valid_forces_mae", "layer_sparsity", "threshold_median", "lr"} <= set(scalars)
    for row in rows:
        step = int(row["step"])
        for tag in ("train_loss", "valid_forces_mae", "layer_sparsity"):
            np.testing.assert_allclose(scalars[tag][step], float(row[tag]), rtol=1e-6)  # event values are float32
    assert sorted(scalars["valid_forces_mae"]) == [int(r["step"]) for r in rows]


def test_tensorboard_without_tensorboardx_names_the_package(tmp_path, capsys, monkeypatch):
    """Refused before the run directory is made."""
    model = write_tiny_model(tmp_path / "model")
    train = write_labelled_frames(tmp_path / "train.xyz", 4, seed=0)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` now raises ImportError
    assert main(["finetune", str(model), "--train", str(train), "--valid-fraction", "0.25", "--epochs", "1",
                 "--tensorboard", "--quiet", "-o", str(tmp_path / "run")]) == 2
    assert "--tensorboard needs the tensorboardX package: pip install tensorboardX" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
