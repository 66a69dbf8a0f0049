"""Model directories: `config.json` plus orbax-saved variables.

    MODEL_DIR/config.json     architecture, element table, dtype, source file
    MODEL_DIR/variables/      orbax PyTree: {"params": ..., "constants": ...}

A fine-tuning run directory holds its result as the model directory
RUN_DIR/model (see `sparse_eqv.finetune.run`); `load_for_inference` accepts
either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from sparse_eqv.atomic_write import atomic_directory
from sparse_eqv.errors import CheckpointError

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def pytree_checkpointer() -> ocp.Checkpointer:
    """An orbax PyTree checkpointer private to this process.

    orbax's default one synchronises all processes of a `jax.distributed`
    job on every save and restore; ours writes only from process 0 and
    reads anywhere (see `sparse_eqv.distributed`), so it must not wait for
    the others. Single-process, it is the default checkpointer.
    """
    import jax

    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=options), multiprocessing_options=options)


def save_model(directory: str | Path, config: dict[str, Any], variables: Any, *, overwrite: bool = False) -> Path:
    """Write a model directory atomically; returns its path."""
    variables = _to_numpy(variables)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True))
        pytree_checkpointer().save((tmp / VARIABLES_DIR).absolute(), variables)
    return Path(directory)


def load_model(directory: str | Path) -> tuple[dict[str, Any], Any]:
    """Read (config, variables) from a model directory."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"{directory}: not a model directory (no {CONFIG_FILE}); make one with `sparse-eqv convert`")
    config = json.loads(config_path.read_text())
    variables = pytree_checkpointer().restore((directory / VARIABLES_DIR).absolute())
    return config, variables


RUN_MODEL_DIR = "model"


def load_for_inference(path: str | Path) -> tuple[dict[str, Any], Any]:
    """(config, variables) of a model directory or of a fine-tuning run
    directory (its best epoch's effective params, merged into the base)."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return load_model(path)
    if (path / RUN_MODEL_DIR / CONFIG_FILE).exists():
        return load_model(path / RUN_MODEL_DIR)
    if (path / "run.json").exists():
        raise CheckpointError(f"{path}: this fine-tuning run has not finished an epoch yet (no {RUN_MODEL_DIR}/)")
    raise CheckpointError(f"{path}: neither a model directory (no {CONFIG_FILE}) nor a fine-tuning run directory")


def _to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(np.asarray, tree)
