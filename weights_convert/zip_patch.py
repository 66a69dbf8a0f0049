"""Replace stored (uncompressed) members of a zip archive in a byte-exact copy.

torch checkpoints keep every tensor storage as an uncompressed zip member,
64-byte aligned. A fine-tuned export changes a few storages and nothing else:
copying the archive byte for byte, overwriting those members' data in place
and updating their CRC-32 in the local header and the central directory keeps
every other byte (order, alignment, metadata, pickled code) identical to the
base file.
"""

from __future__ import annotations

import shutil
import struct
import zipfile
import zlib
from pathlib import Path

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.errors import CheckpointError

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... name length, extra length
_LOCAL_CRC_OFFSET = 14


def _data_offset(handle, info: zipfile.ZipInfo) -> int:
    handle.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        raise CheckpointError(f"bad local header for zip member {info.filename}")
    name_length, extra_length = fields[9], fields[10]
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _central_directory_crc_offsets(path: Path) -> dict[str, int]:
    """File offset of each member's CRC-32 field in the central directory."""
    with zipfile.ZipFile(path) as archive:
        position, count = archive.start_dir, len(archive.infolist())
    offsets = {}
    with open(path, "rb") as handle:
        for _ in range(count):
            handle.seek(position)
            header = handle.read(46)
            if header[:4] != b"PK\x01\x02":
                raise CheckpointError(f"{path}: damaged zip central directory")
            name_length, extra_length, comment_length = struct.unpack_from("<HHH", header, 28)
            name = handle.read(name_length).decode("utf-8", errors="surrogateescape")
            offsets[name] = position + 16
            position += 46 + name_length + extra_length + comment_length
    return offsets


def patch_members(base: str | Path, output: str | Path, members: dict[str, bytes], *, overwrite: bool = True) -> Path:
    """Copy `base` to `output` with the data of `members` replaced.

    Args:
        base: the zip archive (e.g. a torch checkpoint).
        output: where to write; written atomically.
        members: {member name: new bytes}; each member must be stored
            uncompressed and keep its size.
    """
    base, output = Path(base), Path(output)
    with zipfile.ZipFile(base) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    for name, payload in members.items():
        info = infos.get(name)
        if info is None:
            raise CheckpointError(f"{base}: has no member {name}")
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != len(payload):
            raise CheckpointError(
                f"{base}: member {name} is compressed or {info.file_size} bytes, cannot take {len(payload)} bytes in place"
            )
    central = _central_directory_crc_offsets(base)
    with atomic_file(output, overwrite=overwrite) as tmp:
        shutil.copyfile(base, tmp)
        with open(tmp, "r+b") as handle:
            for name, payload in members.items():
                info = infos[name]
                crc = struct.pack("<I", zlib.crc32(payload) & 0xFFFFFFFF)
                offset = _data_offset(handle, info)
                handle.seek(offset)
                handle.write(payload)
                handle.seek(info.header_offset + _LOCAL_CRC_OFFSET)
                handle.write(crc)
                handle.seek(central[name])
                handle.write(crc)
        with zipfile.ZipFile(tmp) as check:
            bad = check.testzip()
            if bad is not None:
                raise CheckpointError(f"patched archive failed its CRC check at {bad}")
    return output
