"""Several hosts through `jax.distributed`: two processes with one CPU device
each run the same `sparse-eqv finetune` command and end with the params of
one process driving two devices (to float64 round-off); process 0 alone
writes the run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from sparse_eqv.checkpoint import load_model, save_model
from sparse_eqv.data.readers import read_frames
from sparse_eqv.models import build_model
from sparse_eqv.testing import tiny_sevenn_config, write_extxyz


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, real_frames_dir):
    root = tmp_path_factory.mktemp("distributed")
    module = build_model(tiny_sevenn_config())
    variables = module.init(jax.random.PRNGKey(1), jax.numpy.ones((3, 3)), jax.numpy.zeros(2, jax.numpy.int32),
                            jax.numpy.array([0, 1, 0]), jax.numpy.array([1, 0, 1]))
    save_model(root / "model", tiny_sevenn_config(), jax.tree.map(np.asarray, variables))
    frames = read_frames(real_frames_dir / "sse-pbe" / "LiGePS-init.system")
    write_extxyz(root / "train.xyz", frames[10:18])
    write_extxyz(root / "valid.xyz", frames[20:22])  # frames 400-401 of the full file
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(workdir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sparse_eqv.cli", "finetune", str(workdir / "model"),
            "--train", str(workdir / "train.xyz"), "--valid", str(workdir / "valid.xyz"), "--method", "str",
            "--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--threshold-decay", "0.3", "--seed", "5",
            "--quiet", "-o", str(out), *extra]


def _params(run_dir: Path) -> dict:
    return traverse_util.flatten_dict(load_model(run_dir / "model")[1]["params"])


def test_two_processes_match_two_local_devices(workdir):
    single = workdir / "single"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = subprocess.run(_command(workdir, single), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    multi = workdir / "multi"
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": ""}
    processes = [
        subprocess.Popen(_command(workdir, multi, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                  "--process-id", str(i)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for i in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]

    metrics = json.loads((multi / "metrics.json").read_text())
    assert metrics["n_devices"] == 2 and json.loads((single / "metrics.json").read_text())["n_devices"] == 2
    expected, got = _params(single), _params(multi)
    assert expected.keys() == got.keys()
    moved = 0
    base = traverse_util.flatten_dict(load_model(workdir / "model")[1]["params"])
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-13, err_msg=str(key))
        moved += int(np.sum(expected[key] != base[key]))
    assert moved > 0  # training changed something, so the comparison means something
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
