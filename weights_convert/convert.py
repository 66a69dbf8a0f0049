"""One entry point for every checkpoint kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weights_convert import mace, nequip, sevenn
from weights_convert.detect import detect_kind
from weights_convert.foundations import resolve


def resolve_checkpoint(name: str | Path) -> Path:
    """A path as given, or the checkpoint a model name stands for (`7net-0`, `mace-mp-0b3-medium`, ...:
    `weights_convert.foundations`, which may download it). A string that is no existing file and has
    neither a directory part nor a file suffix counts as a name."""
    path = Path(name)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    return resolve(str(name))


def convert(checkpoint: str | Path, *, dtype: str = "float64", head: str | None = None, trust: bool = False) -> tuple[dict[str, Any], Any]:
    """(config, variables) of the Flax model that reproduces `checkpoint`."""
    path = resolve_checkpoint(checkpoint)
    kind = detect_kind(path)
    converter = {"mace": mace, "sevenn": sevenn}.get(kind, nequip)  # nequip-ckpt, nequip-package
    config, variables = converter.convert(path, dtype=dtype, head=head, trust=trust)
    config.setdefault("source", {})["path"] = str(path.resolve())  # export writes back into this file's format
    return config, variables
