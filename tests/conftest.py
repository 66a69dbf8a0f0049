"""Shared test set-up: float64 JAX, paths to the repo, the reference data and the MACE env."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPARSE_EQV_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
MACE_PYTHON = REPO_ROOT / ".venv-mace" / "bin" / "python"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real DFT frames); tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mace_python() -> Path:
    """The interpreter of the mace-torch (e3nn 0.4.4) environment made by `make setup`."""
    if not MACE_PYTHON.exists():
        pytest.skip(f"{MACE_PYTHON} missing: run `make setup`")
    return MACE_PYTHON

