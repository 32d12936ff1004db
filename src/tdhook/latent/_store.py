"""A dataset's activations on disk: one memory-mapped tensor per cached module (tensordict memmap)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from ..errors import InvalidInputError
from .stats import IncompatibleInputsError, InvalidParameterError

__all__ = ["ActivationStore"]

#: The store's own metadata file, beside tensordict's ``meta.json``.
_INFO = "tdhook_store.json"


class ActivationStore:
    r"""Write the activations of a whole dataset to disk, batch by batch, and read them back lazily.

    The first :meth:`append` allocates one memory-mapped file per activation with room for
    ``num_samples`` rows (files are sparse: disk is used as rows are written); later batches
    fill the next rows. :meth:`load` returns a TensorDict of memory-mapped tensors with the rows
    written so far: the operating system pages data in as it is read. Split into batches, it
    feeds the streaming estimators (probes, moments, CKA) without ever being in memory whole;
    the dimension estimators take it as any tensor (their kNN search holds one working copy of
    the points, ``O(N·D)``, and ``O(N·k)`` neighbours, never an ``N × N`` matrix).

    Args:
        path: An empty (or missing) folder.
        num_samples: Rows to allocate: the size of the dataset.
        overwrite: Allow a folder that already holds a store (its files are replaced).

    Example::

        store = ActivationStore("acts/", num_samples=len(dataset))
        with store, ActivationCaching(r"layers\.\d+$").prepare(model) as hooked:
            for batch in loader:                         # TensorDicts
                hooked(batch)
                store.append(hooked.hooking_context.cache)
        acts = ActivationStore.load("acts/")             # memory-mapped, batch_size=[count]
        TwoNnDimensionEstimator()(TensorDict(data=acts["layers.3"]))
    """

    def __init__(self, path: str | Path, num_samples: int, *, overwrite: bool = False) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidParameterError(
                f"num_samples must be a positive int (the dataset's size), got {num_samples!r}."
            )
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInputError(f"ActivationStore path {str(self.path)!r} is a file; pass a folder.")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise InvalidInputError(
                f"ActivationStore folder {str(self.path)!r} is not empty; pass an empty folder, or "
                "overwrite=True to replace the store in it."
            )
        self.num_samples = num_samples
        self._data: TensorDictBase | None = None
        self._count = 0

    def __repr__(self) -> str:
        keys = None if self._data is None else sorted(map(str, self._data.keys(True, True)))
        return (
            f"{type(self).__name__}({str(self.path)!r}, count={self._count}/{self.num_samples}, keys={keys})"
        )

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def count(self) -> int:
        """Rows written so far."""
        return self._count

    def append(self, activations: TensorDictBase) -> ActivationStore:
        """Write one batch: every tensor of ``activations`` (e.g. ``ActivationCaching``'s cache).

        All tensors must share their first dimension (the batch); every batch must have the keys,
        trailing shapes and dtypes of the first one.

        Returns:
            ``self``.

        Raises:
            IncompatibleInputsError: For another batch size per key, other keys, shapes or dtypes
                than the first batch, or more rows in all than ``num_samples``.
        """
        if not isinstance(activations, TensorDictBase):
            raise InvalidInputError(
                f"ActivationStore.append expects a TensorDict of activations, got {type(activations).__name__}; "
                "pass e.g. hooked.hooking_context.cache."
            )
        leaves = dict(activations.items(include_nested=True, leaves_only=True))
        if not leaves:
            raise IncompatibleInputsError("ActivationStore.append got an empty TensorDict: nothing to store.")
        sizes = {key: value.shape[0] if value.ndim else None for key, value in leaves.items()}
        batch = next(iter(sizes.values()))
        if batch is None or any(size != batch for size in sizes.values()):
            raise IncompatibleInputsError(
                f"Every activation must have the same first (batch) dimension, got {sizes}."
            )
        if self._count + batch > self.num_samples:
            raise IncompatibleInputsError(
                f"ActivationStore is full: {self._count} of {self.num_samples} rows written, and this batch has "
                f"{batch}. Create the store with num_samples at least the dataset's size."
            )
        if self._data is None:
            self._data = self._allocate(leaves)
        self._check_like_first(leaves)
        for key, value in leaves.items():
            self._data.get(key)[self._count : self._count + batch].copy_(value.detach())
        self._count += batch
        self._write_info()
        return self

    def close(self) -> None:
        """Flush the row count to disk (``append`` already does; kept for ``with`` blocks)."""
        if self._data is not None:
            self._write_info()

    @staticmethod
    def load(path: str | Path) -> TensorDictBase:
        """The stored activations, memory-mapped: a TensorDict with ``batch_size=[count]``.

        Raises:
            InvalidInputError: If ``path`` holds no store.
        """
        info_path = Path(path) / _INFO
        if not info_path.is_file():
            raise InvalidInputError(
                f"No ActivationStore at {str(path)!r} (no {_INFO}); write one with ActivationStore(path, "
                "num_samples).append(...)."
            )
        count = json.loads(info_path.read_text())["count"]
        return TensorDict.load_memmap(path)[:count]

    # ----------------------------------------------------------------- helpers

    def _allocate(self, leaves: dict[Any, torch.Tensor]) -> TensorDictBase:
        if self.path.is_dir():
            for child in self.path.iterdir():  # overwrite=True (checked at construction)
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        shapes = TensorDict(
            {
                key: torch.empty((self.num_samples, *value.shape[1:]), dtype=value.dtype, device="meta")
                for key, value in leaves.items()
            },
            batch_size=[self.num_samples],
        )
        return shapes.memmap_like(str(self.path))

    def _check_like_first(self, leaves: dict[Any, torch.Tensor]) -> None:
        assert self._data is not None
        stored = dict(self._data.items(include_nested=True, leaves_only=True))
        if set(stored) != set(leaves):
            raise IncompatibleInputsError(
                f"ActivationStore got keys {sorted(map(str, leaves))} after batches with "
                f"{sorted(map(str, stored))}; every batch must cache the same modules."
            )
        for key, value in leaves.items():
            want = stored[key]
            if value.shape[1:] != want.shape[1:] or value.dtype != want.dtype:
                raise IncompatibleInputsError(
                    f"ActivationStore got {key!r} with shape (batch, {', '.join(map(str, value.shape[1:]))}) and "
                    f"{value.dtype}, after batches with (batch, {', '.join(map(str, want.shape[1:]))}) and "
                    f"{want.dtype}; pad or cast activations to one shape and dtype."
                )

    def _write_info(self) -> None:
        info = {"count": self._count, "num_samples": self.num_samples}
        (self.path / _INFO).write_text(json.dumps(info))
