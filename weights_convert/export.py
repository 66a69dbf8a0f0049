"""Fine-tuned Flax models back into the torch checkpoint they came from.

The converter's `config["torch_names"]` maps each Flax leaf to a slice of a
torch tensor (`[key, start, stop, leaf_shape, ...]`: leaf =
`state[key].reshape(-1)[start:stop].reshape(leaf_shape)`). Export inverts it:
every leaf whose value differs from the base model's gives a delta at flat
positions of that tensor; the deltas are translated to the base file's own
layout (identity for MACE; SevenNet's loader re-orders and re-signs old
convolution weights, which is replayed on position tags); then only the
storages holding changed tensors are rewritten inside a byte-exact copy of
the base archive (`zip_patch`), or the deltas are written as a sparse patch
(`delta_patch`). Nothing of the base model's package or e3nn version is
needed for MACE; SevenNet's layout translation uses sevenn's own code.

A magnetic-moment head (config["magmom"]) has no place in the torch
packages' models: a merged checkpoint holds the backbone only and the head
is written beside it (OUTPUT.magmom); a patch carries the head inside
(`magmom_head`). `sparse-eqv convert CHECKPOINT --magmom-head FILE` puts
the two back together.
"""

from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.checkpoint import load_model
from sparse_eqv.errors import CheckpointError
from weights_convert.delta_patch import PatchError, TensorDelta, read_patch, sha256_of, write_patch
from weights_convert.magmom_head import SIDE_SUFFIX, add_head, read_head, write_head_file
from weights_convert.nequip import _load_ckpt, _model_from_ckpt
from weights_convert.sevenn import _runtime_model
from weights_convert.sevenn import load_checkpoint as load_sevenn
from weights_convert.torch_pickle import TorchArray, load_checkpoint, module_state_dict
from weights_convert.zip_patch import patch_members


def _leaf(tree: Any, path: str) -> np.ndarray:
    node = tree
    for part in path.split("/"):
        node = node[part]
    return np.asarray(node, dtype=np.float64)


def converter_deltas(config: dict[str, Any], base: Any, new: Any) -> dict[str, dict[int, float]]:
    """{torch key (converter layout): {flat position: delta}} of every leaf that changed."""
    deltas: dict[str, dict[int, float]] = defaultdict(dict)
    for path, entry in config["torch_names"].items():
        key, start = entry[0], entry[1]
        if start is None:  # a Python attribute, not a tensor: never trained
            continue
        before, after = _leaf(base, path).reshape(-1), _leaf(new, path).reshape(-1)
        change = after - before
        for position in np.flatnonzero(change):
            deltas[key][int(start + position)] = float(change[position])
    return dict(deltas)


def file_state_dict(kind: str, checkpoint: Any, path: Path) -> dict[str, TorchArray]:
    """The tensors of a checkpoint object in the file's own state-dict layout."""
    if kind == "mace":
        return module_state_dict(checkpoint)
    if kind == "sevenn":
        return dict(checkpoint["model_state_dict"])
    if kind == "nequip-ckpt" and isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        return dict(checkpoint["state_dict"])
    raise CheckpointError(
        f"{path}: export of {kind!r} files of this form is not supported (nequip: export from a .ckpt; a "
        ".nequip.zip package can then be built from it with nequip-package)"
    )


_NEQUIP_PREFIX = "model.sole_model."


def _nequip_layout(path: Path, state: dict[str, TorchArray]) -> dict[str, list[str]]:
    """nequip GraphModel key -> the Lightning checkpoint keys that hold it: the
    raw weight and, when an EMA module saved them, its EMA copy (which nequip
    evaluates); the EMA order is the model's `named_parameters()` order."""
    layout = {key[len(_NEQUIP_PREFIX):]: [key] for key in state if key.startswith(_NEQUIP_PREFIX)}
    if any(key.startswith("ema.ema_weight_") for key in state):
        model = _model_from_ckpt(path, _load_ckpt(path))
        for index, (name, _) in enumerate(model.named_parameters()):
            layout.setdefault(name, []).append(f"ema.ema_weight_{index}")
    return layout


def _sevenn_layout(path: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """For each key of sevenn's runtime state dict: (file key, file flat position,
    sign) of each element, found by loading position tags through sevenn's own
    backward-compatibility patch."""
    import torch

    cp = load_sevenn(path)
    offsets, tagged, keys = {}, {}, []
    total = 0
    for key, value in cp["model_state_dict"].items():
        if "_w3j_" in key or not value.is_floating_point():
            tagged[key] = value  # CG blocks decide sign flips: keep them real
            continue
        offsets[key] = total
        keys.append(key)
        tagged[key] = (torch.arange(value.numel(), dtype=torch.float64) + total + 1).reshape(value.shape)
        total += value.numel()
    if total >= 2**24:
        raise CheckpointError(f"{path}: too many parameters to tag exactly in float32")
    starts = np.array([offsets[k] for k in keys])
    _, _, state = _runtime_model({**cp, "model_state_dict": tagged}, path)
    layout = {}
    for key, value in state.items():
        if "_w3j_" in key or not value.is_floating_point():
            continue
        tags = value.double().reshape(-1).numpy()
        if tags.size == 0 or not np.all(np.abs(tags) >= 1):
            continue  # a buffer the file does not hold
        magnitude = np.abs(tags).astype(np.int64) - 1
        owner = np.searchsorted(starts, magnitude, side="right") - 1
        if len(set(owner.tolist())) != 1:
            raise CheckpointError(f"{path}: sevenn maps {key} from several file tensors; cannot export")
        file_key = keys[owner[0]]
        layout[key] = (file_key, magnitude - offsets[file_key], np.sign(tags))
    return layout


def file_deltas(kind: str, path: Path, deltas: dict[str, dict[int, float]], state: dict[str, TorchArray]) -> list[TensorDelta]:
    """Deltas in the base file's layout, one TensorDelta per changed tensor."""
    layout = _sevenn_layout(path) if kind == "sevenn" and deltas else None
    nequip_keys = _nequip_layout(path, state) if kind == "nequip-ckpt" and deltas else None
    per_file: dict[str, dict[int, float]] = defaultdict(dict)
    for key, changes in deltas.items():
        positions = np.fromiter(changes.keys(), dtype=np.int64)
        values = np.fromiter(changes.values(), dtype=np.float64)
        if nequip_keys is not None:
            if key not in nequip_keys:
                raise CheckpointError(f"{path}: no checkpoint tensor behind nequip's {key}")
            for file_key in nequip_keys[key]:
                for position, value in zip(positions.tolist(), values.tolist()):
                    per_file[file_key][position] = value
            continue
        if layout is not None:
            if key not in layout:
                raise CheckpointError(f"{path}: no file tensor behind sevenn's {key}")
            file_key, file_positions, signs = layout[key]
            key, values, positions = file_key, values * signs[positions], file_positions[positions]
        for position, value in zip(positions.tolist(), values.tolist()):
            per_file[key][position] = value
    out = []
    for key in sorted(per_file):
        if key not in state:
            raise CheckpointError(f"{path}: has no tensor {key}")
        array = state[key]
        order = np.array(sorted(per_file[key]), dtype=np.int64)
        values = np.array([per_file[key][i] for i in order.tolist()], dtype=np.float64)
        out.append(TensorDelta(key, tuple(array.shape), array.dtype.name, order, values))
    return out


def write_merged(base: Path, output: Path, state: dict[str, TorchArray], deltas: list[TensorDelta], *, overwrite: bool) -> None:
    """Copy `base` to `output` with each delta added to its tensor's storage."""
    storages: dict[str, np.ndarray] = {}
    for delta in deltas:
        array = state[delta.key]
        if getattr(array, "storage_record", None) is None or array.archive is not None:
            raise CheckpointError(f"{base}: tensor {delta.key} is not a plain storage of the archive; cannot export it")
        record = array.storage_record
        if record not in storages:
            storages[record] = _storage_values(base, record, array.dtype)
        values = storages[record]
        strides = tuple(s // array.itemsize for s in array.strides)
        view = np.lib.stride_tricks.as_strided(
            values[array.storage_offset :], shape=array.shape, strides=tuple(s * values.itemsize for s in strides)
        )
        view[...] = delta.apply(np.asarray(view))
    patch_members(base, output, {record: values.tobytes() for record, values in storages.items()}, overwrite=overwrite)


def _storage_values(base: Path, record: str, dtype: np.dtype) -> np.ndarray:
    import zipfile

    with zipfile.ZipFile(base) as archive:
        return np.frombuffer(archive.read(record), dtype=dtype).copy()


def _run_models(run_dir: Path) -> tuple[dict[str, Any], Any, Any, dict[str, Any]]:
    """(config, base variables, fine-tuned variables, run info) of a run directory."""
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise CheckpointError(f"{run_dir}: not a fine-tuning run directory (no run.json)")
    info = json.loads(info_path.read_text())
    if not (run_dir / "model" / "config.json").exists():
        raise CheckpointError(f"{run_dir}: the run has no finished epoch to export (no model/)")
    base_dir = Path(info["model"])
    if not (base_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir}: its base model directory {base_dir} is missing")
    config, new = load_model(run_dir / "model")
    _, base = load_model(base_dir)
    return config, base, new, info


def base_checkpoint(config: dict[str, Any]) -> Path:
    source = config.get("source", {})
    path = Path(source.get("path", ""))
    if not source.get("path") or not path.is_file():
        raise CheckpointError(
            f"base checkpoint not found: looked for {source.get('path') or source.get('file')!r} "
            "(recorded by `sparse-eqv convert`); put the file back there"
        )
    if source.get("sha256") and sha256_of(path) != source["sha256"]:
        raise CheckpointError(f"{path}: is not the file the model was converted from (SHA-256 differs)")
    return path


def export_run(run_dir: str | Path, output: str | Path, *, delta_only: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write the run's fine-tuned model as a checkpoint of its base's format,
    or (delta_only) as a sparse patch. Returns a summary (sizes, nnz, and
    where a moment head went: "magmom_head", the patch or the side file)."""
    run_dir, output = Path(run_dir), Path(output)
    config, base_vars, new_vars, info = _run_models(run_dir)
    path = base_checkpoint(config)
    kind = config["source"]["kind"]
    state = file_state_dict(kind, load_checkpoint(path), path)
    deltas = file_deltas(kind, path, converter_deltas(config, base_vars, new_vars), state)
    head = (config["magmom"], new_vars["params"]["magmom_head"]) if "magmom" in config else None
    if delta_only:
        header = {
            "base_file": path.name,
            "base_sha256": sha256_of(path),
            "kind": kind,
            "method": info.get("method"),
            "thresholds": info.get("threshold_decay"),
        }
        if head is not None:
            header["magmom"] = head[0]
        with atomic_file(output, overwrite=overwrite) as tmp:
            write_patch(tmp, deltas, header)
            if head is not None:
                with zipfile.ZipFile(tmp, "a", compression=zipfile.ZIP_DEFLATED) as archive:
                    add_head(archive, *head)
        head_file = output
    else:
        write_merged(path, output, state, deltas, overwrite=overwrite)
        head_file = output.with_name(output.name + SIDE_SUFFIX)
        if head is not None:
            with atomic_file(head_file, overwrite=True) as tmp:
                write_head_file(tmp, *head)
    return {
        "output": str(output),
        "bytes": output.stat().st_size,
        "base_bytes": path.stat().st_size,
        "tensors": len(deltas),
        "nnz": int(sum(d.indices.size for d in deltas)),
        "magmom_head": None if head is None else str(head_file),
    }


def apply_delta(base: str | Path, patch: str | Path, output: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Rebuild the merged checkpoint from a base checkpoint and a patch. A
    moment head in the patch is not written into the torch checkpoint (the
    summary's "magmom_head" names the patch, which `convert --magmom-head` reads)."""
    base, patch, output = Path(base), Path(patch), Path(output)
    header, deltas = read_patch(patch)
    if not base.is_file():
        raise CheckpointError(f"{base}: base checkpoint not found")
    digest = sha256_of(base)
    if digest != header["base_sha256"]:
        raise PatchError(
            f"{patch}: made for {header.get('base_file')} (SHA-256 {header['base_sha256'][:12]}...), "
            f"but {base} has SHA-256 {digest[:12]}...; refusing to apply it"
        )
    state = file_state_dict(header["kind"], load_checkpoint(base), base)
    for delta in deltas:
        if delta.key not in state:
            raise PatchError(f"{patch}: tensor {delta.key} is not in {base}")
        if tuple(state[delta.key].shape) != delta.shape:
            raise PatchError(f"{patch}: tensor {delta.key} has shape {delta.shape}, {base} has {state[delta.key].shape}")
    write_merged(base, output, state, deltas, overwrite=overwrite)
    return {"output": str(output), "tensors": len(deltas), "nnz": int(sum(d.indices.size for d in deltas)),
            "magmom_head": str(patch) if read_head(patch) is not None else None}
