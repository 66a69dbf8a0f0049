"""Download one file over HTTP(S) so that no half-written or unchecked file is ever left at its target.

The bytes go to `TARGET.part` and are renamed to TARGET only once the size
matches the server's Content-Length and the caller's check passes. Any
failure (network error, short read, failed check, Ctrl-C) deletes the
`.part` file, so a later call starts over from a clean state. Standard
library only (`urllib`); progress is a tqdm bar on stderr.
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from sparse_eqv.errors import DownloadError

# Seconds a connection attempt or a single read may block before the download counts as failed.
TIMEOUT_S = 30.0
_BLOCK_BYTES = 1 << 20


def download(
    url: str,
    target: str | Path,
    *,
    check: Callable[[Path], str | None] | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Fetch `url` into `target` (bytes) and return `target`.

    `check(path)` sees the complete `.part` file and returns None if it is
    good, else a one-line reason: the file is then deleted. Raises
    DownloadError naming the URL on an unreachable host (at the first
    failed connection, after at most `timeout` seconds), an HTTP error, an
    HTML page instead of a file, fewer or more bytes than Content-Length,
    or a failed check.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        _fetch(url, part, check=check, progress=progress, timeout=timeout)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return target


def _fetch(url: str, part: Path, *, check, progress: bool, timeout: float) -> None:
    from tqdm import tqdm

    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url}: the server answered HTTP {error.code} {error.reason}") from None
    except OSError as error:  # URLError, a timeout, a refused or reset connection
        reason = getattr(error, "reason", error)
        raise DownloadError(f"{url}: cannot connect ({reason})") from None
    with response:
        if response.headers.get_content_type() == "text/html":
            raise DownloadError(f"{url}: the server sent an HTML page, not the file (a wrong or moved URL?)")
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        received = 0
        with open(part, "wb") as out, tqdm(
            total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[: -len(".part")],
            file=sys.stderr, disable=not progress,
        ) as bar:
            while True:
                try:
                    block = response.read(_BLOCK_BYTES)
                except (OSError, http.client.HTTPException) as error:
                    raise DownloadError(
                        f"{url}: the connection failed after {received:,} bytes ({error}); the partial file "
                        "was deleted, run the command again to restart the download"
                    ) from None
                if not block:
                    break
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if expected is not None and received != expected:
        raise DownloadError(
            f"{url}: received {received:,} bytes, the server announced {expected:,} (Content-Length): the "
            "download is truncated or corrupt; the partial file was deleted, run the command again to restart it"
        )
    if check is not None:
        reason = check(part)
        if reason is not None:
            raise DownloadError(f"{url}: the downloaded file is corrupt ({reason}); it was deleted")
