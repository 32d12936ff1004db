"""The on-disk format of :class:`~tdhook.latent.ActivationStore`: file names, metadata, the lock.

Everything here touches the file system only through these rules: the metadata is plain JSON
(validated field by field, never unpickled) replaced atomically, data files have generated
names (``t0000.bin``...), and one writer holds ``tdhook_store.lock``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import StoreCorruptError, StoreLockedError

__all__ = [
    "DATA_NAME",
    "DTYPES",
    "LOCK",
    "META",
    "TMP",
    "WriterLock",
    "fsync_dir",
    "is_store",
    "map_entry",
    "own_files",
    "read_meta",
    "row_bytes",
    "write_meta",
]

#: The metadata file, also the marker that a folder holds a store.
META = "tdhook_store.json"
TMP = META + ".tmp"
LOCK = "tdhook_store.lock"
_FORMAT = "tdhook.ActivationStore"
_VERSION = 1
DATA_NAME = re.compile(r"t[0-9]{4,9}\.bin")

DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriterLock:
    """An exclusive, non-blocking lock on ``folder/tdhook_store.lock``, released by the OS on exit."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            raise StoreLockedError(
                f"ActivationStore folder {str(folder)!r} is open for writing by another ActivationStore (this "
                "or another process holds its lock). Close that store first, or write to another folder."
            ) from error
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def row_bytes(dtype: torch.dtype, shape: list[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def read_meta(folder: Path) -> dict[str, Any]:
    """The validated metadata of the store in ``folder`` (plain JSON; never unpickles)."""
    path = folder / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise StoreCorruptError(
            f"ActivationStore metadata {str(path)!r} is not readable JSON ({error}); the folder was not "
            "written by ActivationStore or was edited. Write the store again."
        ) from error

    def bad(what: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"ActivationStore metadata {str(path)!r} is invalid: {what}. The folder was not written by this "
            "version of ActivationStore or was edited; write the store again."
        )

    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise bad(f"format is not {_FORMAT!r}")
    if meta.get("version") != _VERSION:
        raise bad(f"version {meta.get('version')!r}, expected {_VERSION}")
    num, count, entries = meta.get("num_samples"), meta.get("count"), meta.get("entries")
    if not (isinstance(num, int) and not isinstance(num, bool) and num >= 1):
        raise bad(f"num_samples={num!r}")
    if not (isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= num):
        raise bad(f"count={count!r} with num_samples={num}")
    if not isinstance(entries, list):
        raise bad("entries is not a list")
    keys, files = set(), set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise bad(f"entry {entry!r}")
        key, name, dtype, shape = entry.get("key"), entry.get("file"), entry.get("dtype"), entry.get("shape")
        if not (isinstance(key, list) and key and all(isinstance(k, str) and k for k in key)):
            raise bad(f"key {key!r}")
        if not (isinstance(name, str) and DATA_NAME.fullmatch(name)):
            raise bad(f"data file name {name!r} (expected t0000.bin, t0001.bin...)")
        if dtype not in DTYPES:
            raise bad(f"dtype {dtype!r} for {key!r}")
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise bad(f"row shape {shape!r} for {key!r}")
        if tuple(key) in keys or name in files:
            raise bad(f"duplicate key {key!r} or file {name!r}")
        keys.add(tuple(key))
        files.add(name)
    return meta


def is_store(folder: Path) -> bool:
    return (folder / META).is_file()


def own_files(folder: Path) -> list[Path]:
    """Files in ``folder`` the store writes: metadata, its temporary file, data files."""
    return [
        child
        for child in folder.iterdir()
        if child.name in (META, TMP) or (DATA_NAME.fullmatch(child.name) and not child.is_dir())
    ]


def write_meta(folder: Path, num_samples: int, count: int, entries: list[dict[str, Any]]) -> None:
    """Replace the metadata atomically: temporary file, fsync, rename, fsync of the folder."""
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "num_samples": num_samples,
        "count": count,
        "entries": entries,
    }
    tmp = folder / TMP
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / META)
    fsync_dir(folder)


def map_entry(folder: Path, entry: dict[str, Any], num: int, count: int) -> torch.Tensor:
    """The first ``count`` rows of one validated entry's data file, mapped copy-on-write.

    Raises:
        StoreCorruptError: If the file is missing, a link, or not the size the store allocated.
    """
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    file = folder / entry["file"]
    expected = num * row_bytes(dtype, shape)
    if file.is_symlink() or not file.is_file():
        raise StoreCorruptError(
            f"ActivationStore data file {str(file)!r} for {'.'.join(entry['key'])!r} is missing or not a "
            "regular file; the store is incomplete. Write it again."
        )
    size = file.stat().st_size
    if size != expected:
        raise StoreCorruptError(
            f"ActivationStore data file {str(file)!r} for {'.'.join(entry['key'])!r} has {size} bytes, "
            f"expected {expected} ({num} rows of {shape} {entry['dtype']}); it was truncated or edited "
            "(e.g. a partial copy). Copy or write the store again."
        )
    if expected == 0:
        return torch.empty((count, *shape), dtype=dtype)
    mapped = torch.from_file(str(file), shared=False, size=num * math.prod(shape), dtype=dtype)
    return mapped.view(num, *shape)[:count]
