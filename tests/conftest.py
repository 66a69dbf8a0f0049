"""Shared test set-up: float64 JAX, paths to the repo, the real-frame fixtures (tests/data) and the MACE env."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_FRAMES_DIR = REPO_ROOT / "tests" / "data"
MACE_PYTHON = REPO_ROOT / ".venv-mace" / "bin" / "python"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def real_frames_dir() -> Path:
    """tests/data: a few real DFT frames per reference file, in the originals'
    formats and with their names (rmd17/, sse-pbe/, cu/, nio-spin/), cut by
    tests/data/make_fixtures.py; tests/data/README.md lists which frames of
    which source each holds (an index into a fixture is a position in that list)."""
    return REAL_FRAMES_DIR


@pytest.fixture(scope="session")
def mace_python() -> Path:
    """The interpreter of the mace-torch (e3nn 0.4.4) environment made by `make setup`."""
    if not MACE_PYTHON.exists():
        pytest.skip(f"{MACE_PYTHON} missing: run `make setup`")
    return MACE_PYTHON


@pytest.fixture(scope="session")
def small_mace_model(tmp_path_factory, mace_python) -> Path:
    """A `.model` file written by mace-torch itself (`torch.save` of the module): the MACE-OFF23-small
    architecture with reduced channels (16x0e hidden, tests/torch_ref/mace_reference.py), random
    weights (seed 0), float64, for H C N O F P S Cl Br I, r_max 5 Å."""
    import os
    import subprocess

    path = tmp_path_factory.mktemp("small_mace") / "off23-small.model"
    subprocess.run(
        [str(mace_python), str(REPO_ROOT / "tests" / "torch_ref" / "mace_reference.py"), "off23-small", "--seed", "0",
         "--model", str(path)],
        check=True, capture_output=True, env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}, timeout=600,
    )
    return path
