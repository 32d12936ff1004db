"""A dataset's activations on disk: durable, inert, memory-mapped files, one per cached tensor.

Layout of a store folder (nothing else is ever written, read or deleted by the store):

* ``tdhook_store.json``: the metadata and the marker that the folder is a store: plain JSON
  with the format, ``num_samples``, the published row ``count`` and, per tensor, its key, dtype,
  row shape and data file. It is replaced atomically (temporary file, ``fsync``,
  ``os.replace``, ``fsync`` of the folder) after the data it describes is on disk.
* ``t0000.bin``, ``t0001.bin``...: raw row-major data, allocated (sparse) for ``num_samples``
  rows. File names are generated, never derived from keys or module names, so no key can name a
  path outside the folder.
* ``tdhook_store.lock``: held (``flock``) by the one writer while it is open.

A process killed at any moment leaves a store whose metadata describes complete batches only:
rows written after the last publication are ignored on load and overwritten when the store is
resumed. Loading parses JSON and maps files read-only (copy-on-write); it never unpickles.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from ..errors import (
    ContextStateError,
    IncompatibleInputsError,
    InvalidInputError,
    InvalidParameterError,
    StoreCorruptError,
    StoreLockedError,
)
from ._store_format import (
    DTYPES,
    LOCK,
    META,
    TMP,
    WriterLock,
    fsync_dir,
    is_store,
    map_entry,
    own_files,
    read_meta,
    row_bytes,
    write_meta,
)

__all__ = ["ActivationStore", "StoreCorruptError", "StoreLockedError"]


class ActivationStore:
    r"""Write the activations of a whole dataset to disk, batch by batch, and read them back lazily.

    The first :meth:`append` allocates one file per activation with room for ``num_samples``
    rows (sparse: disk is used as rows are written); later batches fill the next rows. Each
    append writes and ``fsync``\ s the rows, then publishes the new row count atomically, so a
    process killed at any moment leaves a store that :meth:`load` reads with every complete
    batch, and that ``ActivationStore(path, num_samples, resume=True)`` continues. :meth:`load`
    returns a TensorDict of tensors mapped from the files (copy-on-write: writing to them never
    changes the files): the operating system pages data in as it is read. Split into batches,
    it feeds the streaming estimators (probes, moments, CKA) without ever being in memory whole;
    the dimension estimators take it as any tensor.

    One writer at a time: a store holds a lock on its folder until :meth:`close` (or the end of
    a ``with`` block); a second store on the same folder, in any thread or process, raises
    :class:`StoreLockedError`. Readers need no lock.

    Args:
        path: A folder: missing or empty for a new store, or holding a store with ``overwrite``
            or ``resume``.
        num_samples: Rows to allocate: the size of the dataset.
        overwrite: Replace the store in ``path``: its own files (metadata and data files) are
            deleted, nothing else. A non-empty folder that is not a store is always refused.
        resume: Continue the store in ``path`` after its published rows (e.g. after a crash);
            a missing or empty folder starts a new store.

    Raises:
        InvalidParameterError: If ``num_samples`` is not a positive int, or ``resume`` finds
            a store of another size.
        InvalidInputError: If ``path`` is a file, a non-empty folder that is not a store, or a
            store while neither ``overwrite`` nor ``resume`` is set.
        StoreLockedError: If another store has the folder open for writing.
        StoreCorruptError: If ``resume`` finds metadata that is not the store's.

    Example::

        store = ActivationStore("acts/", num_samples=len(dataset))
        with store, ActivationCaching(r"layers\.\d+$").prepare(model) as hooked:
            for batch in loader:                         # TensorDicts
                hooked(batch)
                store.append(hooked.hooking_context.cache)
        acts = ActivationStore.load("acts/")             # memory-mapped, batch_size=[count]
        TwoNnDimensionEstimator()(TensorDict(data=acts["layers.3"]))
    """

    def __init__(
        self, path: str | Path, num_samples: int, *, overwrite: bool = False, resume: bool = False
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidParameterError(
                f"num_samples must be a positive int (the dataset's size), got {num_samples!r}."
            )
        if overwrite and resume:
            raise InvalidParameterError(
                "Pass overwrite=True (start again) or resume=True (continue), not both."
            )
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidInputError(
                f"ActivationStore path must be a str or a Path, got {type(path).__name__}."
            )
        self.path = Path(path)
        self.num_samples = num_samples
        self._count = 0
        self._entries: list[dict[str, Any]] = []
        self._lock: WriterLock | None = None
        self._mutex = threading.Lock()
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"ActivationStore path {str(self.path)!r} is a file; pass a folder.")
        self._check_folder(overwrite, resume)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = WriterLock(self.path)
        try:
            self._check_folder(overwrite, resume)  # again, now that no other writer can change it
            if resume and is_store(self.path):
                meta = read_meta(self.path)
                if meta["num_samples"] != num_samples:
                    raise InvalidParameterError(
                        f"resume=True found a store of num_samples={meta['num_samples']} in {str(self.path)!r}, "
                        f"got num_samples={num_samples}. Pass the store's size."
                    )
                self._count, self._entries = meta["count"], meta["entries"]
            else:
                old = own_files(self.path)
                self._publish(0, [])  # the folder is a (new, empty) store from here on
                for child in old:
                    if child.name not in (META, TMP):
                        child.unlink()
        except BaseException:
            self.close()
            raise

    def _check_folder(self, overwrite: bool, resume: bool) -> None:
        if not self.path.is_dir():
            return
        if is_store(self.path):
            if not (overwrite or resume):
                raise InvalidInputError(
                    f"ActivationStore folder {str(self.path)!r} already holds a store; pass resume=True to "
                    "continue it, overwrite=True to replace it, or another folder."
                )
            return
        foreign = [c.name for c in self.path.iterdir() if c.name not in (LOCK, TMP)]
        if foreign:
            raise InvalidInputError(
                f"ActivationStore folder {str(self.path)!r} is not empty and holds no store (it has "
                f"{sorted(foreign)[:3]}); pass an empty or new folder. overwrite=True only replaces a store: "
                "it never deletes other files."
            )

    def __repr__(self) -> str:
        keys = [".".join(e["key"]) for e in self._entries] if self._entries else None
        return (
            f"{type(self).__name__}({str(self.path)!r}, count={self._count}/{self.num_samples}, keys={keys})"
        )

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    @property
    def count(self) -> int:
        """Rows written and published so far."""
        return self._count

    @property
    def closed(self) -> bool:
        return self._lock is None

    def append(self, activations: TensorDictBase) -> ActivationStore:
        """Write one batch: every tensor of ``activations`` (e.g. ``ActivationCaching``'s cache).

        All tensors must share their first dimension (the batch); every batch must have the keys,
        trailing shapes and dtypes of the first one. The rows are on disk (``fsync``) before the
        new count is published, so a crash during ``append`` loses this batch only.

        Returns:
            ``self``.

        Raises:
            ContextStateError: After :meth:`close`.
            IncompatibleInputsError: For another batch size per key, other keys, shapes or dtypes
                than the first batch, or more rows in all than ``num_samples``.
        """
        if not isinstance(activations, TensorDictBase):
            raise InvalidInputError(
                f"ActivationStore.append expects a TensorDict of activations, got {type(activations).__name__}; "
                "pass e.g. hooked.hooking_context.cache."
            )
        with self._mutex:
            if self._lock is None:
                raise ContextStateError(
                    f"ActivationStore {str(self.path)!r} is closed; open it again with resume=True to append."
                )
            leaves = self._leaves(activations)
            batch = next(iter(leaves.values())).shape[0]
            if self._count + batch > self.num_samples:
                raise IncompatibleInputsError(
                    f"ActivationStore is full: {self._count} of {self.num_samples} rows written, and this batch "
                    f"has {batch}. Create the store with num_samples at least the dataset's size."
                )
            entries = self._entries or self._allocate(leaves)
            self._check_like_first(leaves, entries)
            for entry in entries:
                value = leaves[tuple(entry["key"])]
                self._write_rows(entry, value)
            self._publish(self._count + batch, entries)
            self._entries = entries
            self._count += batch
        return self

    def close(self) -> None:
        """Release the folder's lock; the published rows stay (``append`` publishes each batch)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    @staticmethod
    def load(path: str | Path) -> TensorDictBase:
        """The stored activations: a TensorDict with ``batch_size=[count]`` of file-mapped tensors.

        Only JSON is parsed and raw files are mapped (copy-on-write); nothing is unpickled. Rows
        beyond the published count (a batch interrupted by a crash) are not read.

        Raises:
            InvalidInputError: If ``path`` holds no store.
            StoreCorruptError: If the metadata is invalid, or a data file is missing, a link, or
                not the size the store wrote (e.g. truncated by a partial copy).
        """
        folder = Path(path)
        if not is_store(folder):
            raise InvalidInputError(
                f"No ActivationStore at {str(path)!r} (no {META}); write one with ActivationStore(path, "
                "num_samples).append(...)."
            )
        meta = read_meta(folder)
        num, count = meta["num_samples"], meta["count"]
        out = TensorDict({}, batch_size=[count])
        for entry in meta["entries"]:
            out.set(tuple(entry["key"]), map_entry(folder, entry, num, count))
        return out

    # ----------------------------------------------------------------- helpers

    def _leaves(self, activations: TensorDictBase) -> dict[tuple[str, ...], torch.Tensor]:
        leaves = {}
        for key, value in activations.items(include_nested=True, leaves_only=True):
            if not isinstance(value, torch.Tensor):
                raise IncompatibleInputsError(
                    f"ActivationStore.append stores tensors only, got {type(value).__name__} at {key!r}."
                )
            leaves[(key,) if isinstance(key, str) else tuple(key)] = value
        if not leaves:
            raise IncompatibleInputsError("ActivationStore.append got an empty TensorDict: nothing to store.")
        sizes = {".".join(key): value.shape[0] if value.ndim else None for key, value in leaves.items()}
        batch = next(iter(sizes.values()))
        if batch is None or any(size != batch for size in sizes.values()):
            raise IncompatibleInputsError(
                f"Every activation must have the same first (batch) dimension, got {sizes}."
            )
        for key, value in leaves.items():
            if str(value.dtype).removeprefix("torch.") not in DTYPES:
                raise IncompatibleInputsError(
                    f"ActivationStore cannot store {'.'.join(key)!r} of dtype {value.dtype}; supported: "
                    f"{sorted(DTYPES)}. Cast it first."
                )
        return leaves

    def _allocate(self, leaves: dict[tuple[str, ...], torch.Tensor]) -> list[dict[str, Any]]:
        entries = []
        for i, (key, value) in enumerate(leaves.items()):
            name, shape = f"t{i:04d}.bin", list(value.shape[1:])
            entry = {
                "key": list(key),
                "file": name,
                "dtype": str(value.dtype).removeprefix("torch."),
                "shape": shape,
            }
            fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, self.num_samples * row_bytes(value.dtype, shape))
                os.fsync(fd)
            finally:
                os.close(fd)
            entries.append(entry)
        fsync_dir(self.path)
        return entries

    def _check_like_first(
        self, leaves: dict[tuple[str, ...], torch.Tensor], entries: list[dict[str, Any]]
    ) -> None:
        stored = {tuple(e["key"]): e for e in entries}
        if set(stored) != set(leaves):
            raise IncompatibleInputsError(
                f"ActivationStore got keys {sorted('.'.join(k) for k in leaves)} after batches with "
                f"{sorted('.'.join(k) for k in stored)}; every batch must cache the same modules."
            )
        for key, value in leaves.items():
            want = stored[key]
            dtype = str(value.dtype).removeprefix("torch.")
            if list(value.shape[1:]) != want["shape"] or dtype != want["dtype"]:
                raise IncompatibleInputsError(
                    f"ActivationStore got {'.'.join(key)!r} with shape (batch, {', '.join(map(str, value.shape[1:]))}) "
                    f"and torch.{dtype}, after batches with (batch, {', '.join(map(str, want['shape']))}) and "
                    f"torch.{want['dtype']}; pad or cast activations to one shape and dtype."
                )

    def _write_rows(self, entry: dict[str, Any], value: torch.Tensor) -> None:
        row = row_bytes(value.dtype, entry["shape"])
        data = value.detach().to("cpu").contiguous().reshape(-1)
        raw: Any = data.view(torch.uint8).numpy() if data.numel() else b""
        with open(self.path / entry["file"], "r+b") as f:
            f.seek(self._count * row)
            f.write(memoryview(raw))
            f.flush()
            os.fsync(f.fileno())

    def _publish(self, count: int, entries: list[dict[str, Any]]) -> None:
        write_meta(self.path, self.num_samples, count, entries)
