"""The magnetic-moment head as zip members, inside a delta patch or a side file.

The torch packages (mace-torch, nequip, sevenn) have no moment head, so an
exported torch checkpoint holds the backbone only. The head travels beside
it: `export --delta-only` adds these members to the patch, a merged export
writes them to OUTPUT.magmom (a zip of its own). `sparse-eqv convert
CHECKPOINT --magmom-head FILE` reattaches it.

Members (numpy + json, readable without JAX or torch):

    magmom/head.json       {"format": "sparse-eqv-magmom/1",
                            "config": config["magmom"] of the model,
                            "leaves": [{"path": "hidden/kernel", "file": "magmom/0.npy"}, ...]}
    magmom/<i>.npy         one params leaf of the head each
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sparse_eqv.errors import CheckpointError

FORMAT = "sparse-eqv-magmom/1"
HEADER = "magmom/head.json"
SIDE_SUFFIX = ".magmom"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for name, value in tree.items():
        path = f"{prefix}{name}"
        out.update(_flatten(value, path + "/") if isinstance(value, dict) else {path: np.asarray(value)})
    return out


def add_head(archive: zipfile.ZipFile, config: dict[str, Any], params: dict[str, Any]) -> None:
    """Write the head (its config["magmom"] and params) into an open archive."""
    leaves = []
    for i, (path, value) in enumerate(sorted(_flatten(params).items())):
        buffer = io.BytesIO()
        np.save(buffer, value, allow_pickle=False)
        archive.writestr(f"magmom/{i}.npy", buffer.getvalue())
        leaves.append({"path": path, "file": f"magmom/{i}.npy"})
    archive.writestr(HEADER, json.dumps({"format": FORMAT, "config": config, "leaves": leaves}, indent=1))


def write_head_file(path: str | Path, config: dict[str, Any], params: dict[str, Any]) -> None:
    """A zip holding only the head (the caller makes the write atomic)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        add_head(archive, config, params)


def read_head(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config["magmom"], params) of the head in a patch or side file; None if it holds none."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if HEADER not in archive.namelist():
                return None
            header = json.loads(archive.read(HEADER))
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{path}: unknown moment-head format {header.get('format')!r} (expected {FORMAT})")
            params: dict[str, Any] = {}
            for leaf in header["leaves"]:
                *parents, name = leaf["path"].split("/")
                node = params
                for part in parents:
                    node = node.setdefault(part, {})
                node[name] = np.load(io.BytesIO(archive.read(leaf["file"])), allow_pickle=False)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable moment-head file ({type(error).__name__}: {error})") from error
    return header["config"], params
