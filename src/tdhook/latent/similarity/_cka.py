"""Centred kernel alignment (Kornblith et al., 2019) between two views, as a TensorDict module."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey

from ..._checks import check_chunk_size, check_number, format_repr
from ._kernels import CkaKernel, linear_cka, parse_kernel, rbf_cka
from ._validation import empty_output, read_pair

__all__ = ["CkaEstimator"]


class CkaEstimator(TensorDictModuleBase):
    """CKA similarity of two representations of the same samples.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`` with ``K``, ``L`` the kernel matrices of
    the two views. For the linear kernel on column-centred data this is
    ``‖AᵀB‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F)``, computed from ``D × D`` products (or the ``N × N`` Gram
    form when there are fewer samples than features). The RBF kernel is accumulated over row
    blocks, so memory stays ``O(chunk · N)``. CKA is invariant to orthogonal transforms and
    isotropic scaling of either view; identical views give 1.

    Reads ``(N, D_a)`` / ``(N, D_b)`` or ``(..., N, D_·)`` views (widths may differ, batch shapes
    and ``N`` must match) and writes one float32 value per dataset, shape ``batch``; NaN where
    the denominator is ``<= eps`` or not finite (e.g. constant data).

    Args:
        in_key_a: Key of the first view.
        in_key_b: Key of the second view.
        out_key: Key of the result.
        kernel: ``"linear"`` or ``"rbf"`` (see :class:`CkaKernel`).
        eps: Denominator threshold under which the result is NaN.
        sigma: RBF bandwidth; ``None`` uses the median heuristic per view and dataset.
        chunk_size: Rows per RBF block (``None``: automatic).

    Raises:
        UnknownKernelError: For an unknown kernel name (a ``NotImplementedError``, as tdhook 0.1
            raised for non-linear kernels, and a ``ValueError``).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> a = torch.randn(100, 8)
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8))
        >>> td = CkaEstimator()(TensorDict({"data_a": a, "data_b": 3 * a @ q}))
        >>> round(float(td["cka"]), 5)
        1.0
    """

    def __init__(
        self,
        in_key_a: NestedKey = "data_a",
        in_key_b: NestedKey = "data_b",
        out_key: NestedKey = "cka",
        kernel: CkaKernel | str = CkaKernel.LINEAR,
        eps: float = 1e-12,
        *,
        sigma: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel = parse_kernel(kernel)
        if sigma is not None:
            check_number(
                sigma, name="sigma", minimum=0, strict=True, hint="Pass None for the median heuristic."
            )
        self.in_key_a = in_key_a
        self.in_key_b = in_key_b
        self.out_key = out_key
        self.eps = check_number(eps, name="eps", minimum=0, hint="e.g. 1e-12.")
        self.sigma = None if sigma is None else float(sigma)
        self.chunk_size = check_chunk_size(chunk_size)
        self.in_keys = [in_key_a, in_key_b]
        self.out_keys = [out_key]

    def __repr__(self) -> str:
        fields: dict[str, object] = {"kernel": self.kernel.value, "eps": self.eps}
        if self.kernel is CkaKernel.RBF:
            fields["sigma"] = self.sigma
        return format_repr(self, **fields)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Compute CKA between ``tensordict[in_key_a]`` and ``tensordict[in_key_b]``."""
        a, b, batch = read_pair(
            tensordict, self.in_key_a, self.in_key_b, owner=type(self).__name__, method="CKA"
        )
        if a.shape[0] == 0:
            tensordict.set(self.out_key, empty_output(batch, a.device))
            return tensordict
        a, b = a.to(torch.float64), b.to(torch.float64)
        if self.kernel is CkaKernel.LINEAR:
            value = linear_cka(a, b, self.eps)
        else:
            value = torch.stack(
                [
                    rbf_cka(a[i], b[i], sigma=self.sigma, eps=self.eps, chunk_size=self.chunk_size)
                    for i in range(a.shape[0])  # datasets, not points
                ]
            )
        tensordict.set(self.out_key, value.to(torch.float32).reshape(batch))
        return tensordict
