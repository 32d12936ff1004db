"""Minibatch CKA (Nguyen et al., 2021) accumulated over a stream of batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..._checks import as_float, as_tensor, check_finite, check_number
from ..._distributed import all_reduce_sum, require_process_group
from ...errors import IncompatibleInputsError, InsufficientSamplesError
from ._kernels import CkaKernel, cka_from_hsic, gram_matrix, hsic_unbiased, parse_kernel

__all__ = ["StreamingCka"]


class StreamingCka:
    """CKA of two representations, averaged over minibatches with the unbiased HSIC estimator.

    Each :meth:`update` computes, on its ``n >= 4`` samples, the unbiased HSIC of Song et al.
    (2012) for the pairs ``(K, L)``, ``(K, K)`` and ``(L, L)`` and adds them to running sums.
    :meth:`compute` returns ``mean HSIC(K, L) / sqrt(mean HSIC(K, K) · mean HSIC(L, L))``, the
    minibatch CKA of Nguyen, Raghu & Kornblith (2021, "Do wide and deep networks learn the same
    things?"). Because the estimator is unbiased, the average does not depend on the batch size
    (unlike averaging biased per-batch CKA), and memory is ``O(n²)`` for a batch of ``n``.

    Args:
        kernel: ``"linear"`` or ``"rbf"``.
        sigma: RBF bandwidth; ``None`` uses the median heuristic on each batch and view.
        eps: Denominator threshold under which :meth:`compute` returns NaN.

    Examples:
        >>> import torch
        >>> cka = StreamingCka()
        >>> x = torch.randn(1024, 16)
        >>> for xb in x.split(128):
        ...     _ = cka.update(xb, 2 * xb)
        >>> round(float(cka.compute()), 6)
        1.0
    """

    def __init__(
        self, kernel: CkaKernel | str = CkaKernel.LINEAR, *, sigma: float | None = None, eps: float = 1e-12
    ) -> None:
        self.kernel = parse_kernel(kernel)
        if sigma is not None:
            check_number(
                sigma, name="sigma", minimum=0, strict=True, hint="Pass None for the median heuristic."
            )
        self.sigma = None if sigma is None else float(sigma)
        self.eps = check_number(eps, name="eps", minimum=0, hint="e.g. 1e-12.")
        self._sums: Tensor | None = None  # [HSIC(K,L), HSIC(K,K), HSIC(L,L), number of batches]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel={self.kernel.value!r}, sigma={self.sigma}, batches={self.num_batches})"

    def reset(self) -> StreamingCka:
        """Forget all batches."""
        self._sums = None
        return self

    def update(self, x: Any, y: Any) -> StreamingCka:
        """Add one minibatch: row ``i`` of ``x`` and ``y`` describe the same sample.

        Args:
            x: ``(n, D_x)`` first representation (``(n, ...)`` is flattened), ``n >= 4``.
            y: ``(n, D_y)`` second representation.

        Returns:
            ``self``.

        Raises:
            IncompatibleInputsError: If the sample counts differ.
            InsufficientSamplesError: If ``n < 4`` (the unbiased estimator needs 4 samples).
            NonFiniteInputError: If a view holds NaN or inf.
        """
        a = as_float(as_tensor(x, name="x"))
        b = as_float(as_tensor(y, name="y"))
        if a.ndim < 1 or b.ndim < 1 or a.shape[0] != b.shape[0]:
            raise IncompatibleInputsError(
                f"x and y must have the same number of samples (first dimension), got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}."
            )
        if a.device != b.device:
            raise IncompatibleInputsError(
                f"x and y must be on the same device, got {a.device} and {b.device}."
            )
        n = a.shape[0]
        if n < 4:
            raise InsufficientSamplesError(
                f"StreamingCka.update needs at least 4 samples per batch (unbiased HSIC), got {n}; use larger batches."
            )
        check_finite(a, name="x")
        check_finite(b, name="y")
        a = a.reshape(n, -1).to(torch.float64)
        b = b.reshape(n, -1).to(torch.float64)
        k_mat = gram_matrix(a, self.kernel, self.sigma)
        l_mat = gram_matrix(b, self.kernel, self.sigma)
        batch = torch.stack(
            [
                hsic_unbiased(k_mat, l_mat),
                hsic_unbiased(k_mat, k_mat),
                hsic_unbiased(l_mat, l_mat),
                torch.ones((), dtype=torch.float64, device=a.device),
            ]
        )
        self._sums = batch if self._sums is None else self._sums + batch.to(self._sums.device)
        return self

    @property
    def num_batches(self) -> int:
        """Number of minibatches accumulated."""
        return 0 if self._sums is None else round(float(self._sums[3]))

    def compute(self) -> Tensor:
        """Minibatch CKA so far, a 0-d float64 tensor (NaN if a denominator is ``<= eps``).

        Raises:
            InsufficientSamplesError: Before any batch.
        """
        if self._sums is None:
            raise InsufficientSamplesError(
                "StreamingCka.compute() needs at least one batch; call update(x, y) first."
            )
        hsic_xy, hsic_xx, hsic_yy, _ = self._sums
        return cka_from_hsic(hsic_xy, hsic_xx, hsic_yy, self.eps)

    def state(self) -> dict[str, Tensor]:
        """Running sums as a dict of tensors: ``hsic_xy``, ``hsic_xx``, ``hsic_yy``, ``num_batches``."""
        if self._sums is None:
            return {}
        names = ("hsic_xy", "hsic_xx", "hsic_yy", "num_batches")
        return {name: self._sums[i].clone() for i, name in enumerate(names)}

    def all_reduce(self, group: Any = None) -> StreamingCka:
        """Sum the running sums of every rank, so each rank gets the CKA over all ranks' batches.

        A rank without batches contributes zeros.

        Raises:
            DistributedNotInitializedError: If no process group is initialised.
        """
        require_process_group(type(self).__name__)
        sums = self._sums if self._sums is not None else torch.zeros(4, dtype=torch.float64)
        all_reduce_sum([sums], group)
        self._sums = sums
        return self
