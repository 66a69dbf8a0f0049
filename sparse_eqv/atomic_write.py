"""Write files and directories so that readers never see them half-written.

Everything is written under a temporary name next to the target and moved
into place with one rename; an existing target is left untouched unless
`overwrite` is set, and then replaced only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from sparse_eqv.errors import SparseEqvError


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise SparseEqvError(f"{target}: already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_file(target: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to `target`."""
    target = Path(target)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target`."""
    target = Path(target).absolute()
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
