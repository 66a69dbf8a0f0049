"""Tell which converter a checkpoint needs, without unpickling it.

The pickle opcode stream is scanned for the global names and string
constants it contains (`pickletools.genops` decodes, it never executes).
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

from sparse_eqv.errors import CheckpointError

KINDS = ("mace", "sevenn", "nequip")


def _pickle_strings(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pickles:
            raise CheckpointError(f"{path}: a zip archive but not a torch checkpoint (no data.pkl)")
        data = archive.read(pickles[0])
    strings = set()
    try:
        for _, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.add(arg)
    except Exception as error:  # genops raises ValueError and others on corrupt data
        raise CheckpointError(f"{path}: corrupt pickle in torch checkpoint ({error})") from error
    return strings


def detect_kind(path: str | Path) -> str:
    """One of KINDS for a checkpoint file; CheckpointError naming the problem otherwise."""
    path = Path(path)
    name = path.name
    if name.endswith((".nequip.pt2", ".nequip.pth")):
        raise CheckpointError(
            f"{path}: an AOT-compiled nequip model cannot be converted (its weights are compiled into "
            "code); bring the training checkpoint (.ckpt) or the packaged model (.nequip.zip) instead"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: is not a torch checkpoint (not a zip archive; legacy torch files must be re-saved)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if name.endswith(".nequip.zip") or any("/.data/extern_modules" in n for n in names):
        return "nequip"
    strings = _pickle_strings(path)
    if any(s.startswith("mace.") for s in strings):
        return "mace"
    if "model_state_dict" in strings and "config" in strings:
        return "sevenn"
    if "state_dict" in strings and ("hyper_parameters" in strings or any("nequip" in s for s in strings)):
        return "nequip"
    raise CheckpointError(
        f"{path}: a torch checkpoint, but not one of a MACE model (.model), a nequip checkpoint "
        "(.ckpt/.nequip.zip) or a SevenNet checkpoint (.pth)"
    )
