"""Foundation models by name: the MACE checkpoints mace-torch's calculators download and the SevenNet
checkpoints bundled in the sevenn wheel.

`resolve("mace-mp-0b3-medium")` returns a local `.model` file, looked for in order:
1. our cache, `$SPARSE_EQV_CACHE` (default `$XDG_CACHE_HOME/sparse_eqv`, else `~/.cache/sparse_eqv`),
   as `NAME.model`;
2. mace-torch's cache (`$XDG_CACHE_HOME/mace`, else `~/.cache/mace`), under the file name mace-torch's
   own download gives it (`mace_mp(model="medium-0b3")`, `mace_off(model="small")`);
3. a download into our cache (`sparse_eqv.download`: atomic, size- and zip-CRC-checked, progress bar).

The names and URLs are those of `mace/calculators/foundations_models.py` in mace-torch 0.3.16; none of
them has a published checksum, so a download is checked by its Content-Length and by reading the whole
zip archive (every member's CRC-32). `$SPARSE_EQV_FOUNDATIONS_URL` replaces every URL's directory by
one base URL (a mirror holding the files under their release names; the tests use a local server).
"""

from __future__ import annotations

import difflib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparse_eqv.download import download
from sparse_eqv.errors import CheckpointError, DownloadError, UnsupportedModelError
from weights_convert.sevenn import bundled_names, resolve_bundled

CACHE_ENV = "SPARSE_EQV_CACHE"
BASE_URL_ENV = "SPARSE_EQV_FOUNDATIONS_URL"

_MP = "https://github.com/ACEsuit/mace-mp/releases/download"
_FOUNDATIONS = "https://github.com/ACEsuit/mace-foundations/releases/download"
_OFF = "https://raw.githubusercontent.com/ACEsuit/mace-off/main/mace_off23"
_ASL = "https://github.com/gabor1/ASL"


@dataclass(frozen=True)
class MaceFoundation:
    """One MACE foundation checkpoint: our name, its URL and mace-torch's name and cache file for it."""

    name: str
    url: str
    mace_call: str  # how a mace-torch user asks for it
    mace_cache_file: str  # the file name mace-torch's download gives it in its cache directory
    asl: bool = False  # released under the Academic Software License, not MIT

    @property
    def file_name(self) -> str:
        """The release file name (last part of the URL)."""
        return self.url.rsplit("/", 1)[1]


def _mp(name: str, key: str, url: str, asl: bool = False) -> MaceFoundation:
    # mace_mp() keeps only letters, digits and "_" of the file name ("...epoch-199.model" -> "...epoch199model")
    file_name = url.rsplit("/", 1)[1]
    cache_file = "".join(c for c in file_name if c.isalnum() or c == "_")
    return MaceFoundation(name, url, f'mace_mp(model="{key}")', cache_file, asl)


def _off(name: str, key: str, url: str) -> MaceFoundation:
    return MaceFoundation(name, url, f'mace_off(model="{key}")', url.rsplit("/", 1)[1])


MACE_FOUNDATIONS = {
    m.name: m
    for m in [
        _mp("mace-mp-0-small", "small", f"{_MP}/mace_mp_0/2023-12-10-mace-128-L0_energy_epoch-249.model"),
        _mp("mace-mp-0-medium", "medium", f"{_MP}/mace_mp_0/2023-12-03-mace-128-L1_epoch-199.model"),
        _mp("mace-mp-0-large", "large", f"{_MP}/mace_mp_0/MACE_MPtrj_2022.9.model"),
        _mp("mace-mp-0b-small", "small-0b", f"{_MP}/mace_mp_0b/mace_agnesi_small.model"),
        _mp("mace-mp-0b-medium", "medium-0b", f"{_MP}/mace_mp_0b/mace_agnesi_medium.model"),
        _mp("mace-mp-0b2-small", "small-0b2", f"{_MP}/mace_mp_0b2/mace-small-density-agnesi-stress.model"),
        _mp("mace-mp-0b2-medium", "medium-0b2", f"{_MP}/mace_mp_0b2/mace-medium-density-agnesi-stress.model"),
        _mp("mace-mp-0b2-large", "large-0b2", f"{_MP}/mace_mp_0b2/mace-large-density-agnesi-stress.model"),
        _mp("mace-mp-0b3-medium", "medium-0b3", f"{_MP}/mace_mp_0b3/mace-mp-0b3-medium.model"),
        _mp("mace-mpa-0-medium", "medium-mpa-0", f"{_MP}/mace_mpa_0/mace-mpa-0-medium.model"),
        _mp("mace-omat-0-small", "small-omat-0", f"{_MP}/mace_omat_0/mace-omat-0-small.model", asl=True),
        _mp("mace-omat-0-medium", "medium-omat-0", f"{_MP}/mace_omat_0/mace-omat-0-medium.model", asl=True),
        _mp("mace-matpes-pbe-0", "mace-matpes-pbe-0", f"{_FOUNDATIONS}/mace_matpes_0/MACE-matpes-pbe-omat-ft.model",
            asl=True),
        _mp("mace-matpes-r2scan-0", "mace-matpes-r2scan-0",
            f"{_FOUNDATIONS}/mace_matpes_0/MACE-matpes-r2scan-omat-ft.model", asl=True),
        _mp("mace-mh-0", "mh-0", f"{_FOUNDATIONS}/mace_mh_1/mace-mh-0.model"),
        _mp("mace-mh-1", "mh-1", f"{_FOUNDATIONS}/mace_mh_1/mace-mh-1.model"),
        _off("mace-off23-small", "small", f"{_OFF}/MACE-OFF23_small.model"),
        _off("mace-off23-medium", "medium", f"{_OFF}/MACE-OFF23_medium.model"),
        _off("mace-off23-large", "large", f"{_OFF}/MACE-OFF23_large.model"),
    ]
}

# Named by mace-torch, but built from blocks the converter refuses (README, "Supported models").
NOT_CONVERTIBLE = {
    "mace-omol-0-extra-large": "MACE-OMOL embeds the total charge and spin (embedding_specs)",
    "mace-polar-1-s": "MACE-POLAR adds a polarisable long-range field",
    "mace-polar-1-m": "MACE-POLAR adds a polarisable long-range field",
    "mace-polar-1-l": "MACE-POLAR adds a polarisable long-range field",
}


def cache_dir() -> Path:
    """Where downloads go: $SPARSE_EQV_CACHE, else $XDG_CACHE_HOME/sparse_eqv, else ~/.cache/sparse_eqv."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return _xdg_cache() / "sparse_eqv"


def mace_cache_dir() -> Path:
    """mace-torch's cache directory (`mace.tools.utils.get_cache_dir`)."""
    return _xdg_cache() / "mace"


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def sevenn_names() -> list[str]:
    """The SevenNet checkpoint names bundled in the sevenn wheel (`7net-0`, ...)."""
    return bundled_names()


def known_names() -> list[str]:
    """Every name `resolve` accepts."""
    return list(MACE_FOUNDATIONS) + sevenn_names()


def download_url(model: MaceFoundation) -> str:
    """The URL the file is fetched from: the release URL, or the file under $SPARSE_EQV_FOUNDATIONS_URL."""
    base = os.environ.get(BASE_URL_ENV)
    return f"{base.rstrip('/')}/{model.file_name}" if base else model.url


def resolve(name: str, *, progress: bool = True) -> Path:
    """The local checkpoint file a foundation-model name stands for, downloading it if needed.

    Raises CheckpointError for an unknown name (listing the known ones and the closest),
    UnsupportedModelError for a model the converter refuses, DownloadError (with the
    URL and where to put the file by hand) when it cannot be downloaded whole.
    """
    key = name.strip().lower()
    if key in sevenn_names():
        path = resolve_bundled(key)
        if path is None:
            raise CheckpointError(f"{name}: a SevenNet checkpoint bundled in the sevenn wheel, which is not "
                                  "installed here (pip install 'sparse-eqv[torch]')")
        return path
    if key in NOT_CONVERTIBLE:
        raise UnsupportedModelError(f"{name}: named by mace-torch, but cannot be converted: {NOT_CONVERTIBLE[key]}")
    model = MACE_FOUNDATIONS.get(key)
    if model is None:
        raise CheckpointError(_unknown(name))
    if model.asl:
        print(f"note: {model.name} is released under the Academic Software License ({_ASL}); using it means "
              "accepting its terms", file=sys.stderr)
    ours = cache_dir() / f"{model.name}.model"
    if ours.is_file():
        return ours
    theirs = mace_cache_dir() / model.mace_cache_file
    if theirs.is_file():
        if zipfile.is_zipfile(theirs):
            return theirs
        print(f"note: {theirs} (mace-torch's cache) is not a whole torch checkpoint; downloading {model.name} "
              "again", file=sys.stderr)
    url = download_url(model)
    print(f"downloading {model.name} from {url} to {ours}", file=sys.stderr)
    try:
        return download(url, ours, check=_whole_zip, progress=progress)
    except DownloadError as error:
        raise DownloadError(
            f"{error}. To fetch it by hand, download {url} and put it at {ours} (or at {theirs}, where "
            f"mace-torch's {model.mace_call} keeps it), or give convert the file's path"
        ) from None


def _unknown(name: str) -> str:
    names = known_names()
    closest = difflib.get_close_matches(name.strip().lower(), names + list(NOT_CONVERTIBLE), n=1, cutoff=0.4)
    hint = f" (closest: {closest[0]})" if closest else ""
    return f"{name}: no such file, and not a model name we know{hint}. Known names: {', '.join(names)}"


def _whole_zip(path: Path) -> str | None:
    """None if `path` is a zip archive (as torch checkpoints are) whose every member reads back with its CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"not a zip archive: {error}"
    return None if bad is None else f"member {bad} fails its CRC-32 check"
