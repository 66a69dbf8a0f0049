"""Sparse delta patches: the few numbers a fine-tuning run changed.

Format (a zip archive, readable with the standard library and numpy alone):

    patch.json              header (UTF-8 JSON):
        format              "sparse-eqv-delta/1"
        base_file           file name of the base checkpoint
        base_sha256         SHA-256 of the base checkpoint's bytes
        kind                "mace" | "sevenn" | "nequip"
        method, thresholds  how the delta was trained (informational)
        tensors             [{"key": state-dict key in the base file's own
                              layout, "shape": [...], "dtype": storage dtype,
                              "nnz": K, "indices": "<i>.indices.npy",
                              "values": "<i>.values.npy"}]
    <i>.indices.npy         (K,) int32/int64 row-major flat positions
    <i>.values.npy          (K,) float64 deltas

Applying a patch: ``new = (old.astype(float64) + delta).astype(dtype)`` at
the listed positions, everything else untouched. `apply_to_state_dict` does
that for a torch state dict in memory (numpy + torch only, no JAX):

    state = torch.load(base_file, weights_only=True)          # or model.state_dict()
    apply_to_state_dict(state["model_state_dict"], "run.delta")  # SevenNet
    # MACE: sd = model.state_dict(); apply_to_state_dict(sd, patch); model.load_state_dict(sd)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sparse_eqv.errors import CheckpointError

FORMAT = "sparse-eqv-delta/1"
HEADER = "patch.json"


class PatchError(CheckpointError):
    """A patch that cannot be read or does not belong to the given base
    (importing this needs neither JAX nor torch)."""


@dataclasses.dataclass(frozen=True)
class TensorDelta:
    """Changes to one tensor: `values` added at row-major `indices`.

    Attributes:
        key: state-dict key in the base file's layout.
        shape: the tensor's shape.
        dtype: its storage dtype name (numpy), e.g. "float32".
        indices: (K,) int64 flat positions.
        values: (K,) float64 deltas.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    indices: np.ndarray
    values: np.ndarray

    def apply(self, array: np.ndarray) -> np.ndarray:
        """A new array equal to `array` with the delta added at `indices`."""
        if tuple(array.shape) != tuple(self.shape):
            raise PatchError(f"tensor {self.key}: shape {tuple(array.shape)} in the base, {self.shape} in the patch")
        flat = np.array(array, copy=True).reshape(-1)
        flat[self.indices] = (flat[self.indices].astype(np.float64) + self.values).astype(flat.dtype)
        return flat.reshape(array.shape)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_patch(path: str | Path, deltas: list[TensorDelta], header: dict[str, Any]) -> None:
    """Write `deltas` and `header` (base_file, base_sha256, kind, method...) to `path`
    (the caller makes the write atomic)."""
    tensors = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i, delta in enumerate(deltas):
            index_dtype = np.int32 if int(np.prod(delta.shape)) < 2**31 else np.int64
            archive.writestr(f"{i}.indices.npy", _npy_bytes(delta.indices.astype(index_dtype)))
            archive.writestr(f"{i}.values.npy", _npy_bytes(delta.values.astype(np.float64)))
            tensors.append(
                {"key": delta.key, "shape": list(delta.shape), "dtype": delta.dtype, "nnz": int(delta.indices.size),
                 "indices": f"{i}.indices.npy", "values": f"{i}.values.npy"}
            )
        archive.writestr(HEADER, json.dumps({"format": FORMAT, **header, "tensors": tensors}, indent=1))


def read_patch(path: str | Path) -> tuple[dict[str, Any], list[TensorDelta]]:
    """(header, deltas) of a patch file; PatchError naming the file otherwise."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            header = json.loads(archive.read(HEADER))
            if header.get("format") != FORMAT:
                raise PatchError(f"{path}: unknown patch format {header.get('format')!r} (expected {FORMAT})")
            deltas = []
            for entry in header["tensors"]:
                indices = np.load(io.BytesIO(archive.read(entry["indices"])), allow_pickle=False).astype(np.int64)
                values = np.load(io.BytesIO(archive.read(entry["values"])), allow_pickle=False)
                size = int(np.prod(entry["shape"]))
                if indices.shape != values.shape or indices.shape != (entry["nnz"],):
                    raise PatchError(f"{path}: tensor {entry['key']}: indices/values do not match nnz")
                if indices.size and (indices.min() < 0 or indices.max() >= size):
                    raise PatchError(f"{path}: tensor {entry['key']}: index out of range for shape {entry['shape']}")
                if not np.all(np.isfinite(values)):
                    raise PatchError(f"{path}: tensor {entry['key']}: non-finite delta values")
                deltas.append(TensorDelta(entry["key"], tuple(entry["shape"]), entry["dtype"], indices, values))
    except PatchError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise PatchError(f"{path}: not a readable sparse-eqv delta patch ({type(error).__name__}: {error})") from error
    return header, deltas


def apply_to_state_dict(state_dict: dict, patch: str | Path) -> dict:
    """Apply a patch in place to a torch state dict (or a dict of numpy arrays)
    in the base file's layout; returns the same dict. Needs numpy (and torch
    only if the values are tensors)."""
    _, deltas = read_patch(patch)
    for delta in deltas:
        if delta.key not in state_dict:
            raise PatchError(f"{patch}: tensor {delta.key} is not in the given state dict")
        value = state_dict[delta.key]
        if hasattr(value, "detach"):  # a torch tensor
            import torch

            new = delta.apply(value.detach().cpu().numpy())
            with torch.no_grad():
                value.copy_(torch.from_numpy(new))
        else:
            state_dict[delta.key] = delta.apply(np.asarray(value))
    return state_dict
