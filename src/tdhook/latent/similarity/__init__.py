"""Similarity of two representations of the same samples, as TensorDict modules and streams.

* :class:`CkaEstimator`: centred kernel alignment (linear or RBF kernel), keys ``"data_a"``,
  ``"data_b"`` → ``"cka"``.
* :class:`InformationImbalanceEstimator`: neighbourhood-rank information imbalance in both
  directions, computed in row blocks.
* :class:`StreamingCka`: minibatch CKA with the unbiased HSIC estimator, for activations seen
  batch by batch (and across processes with ``all_reduce``).
"""

from __future__ import annotations

from ._cka import CkaEstimator
from ._information_imbalance import InformationImbalanceEstimator
from ._kernels import CkaKernel
from ._streaming_cka import StreamingCka

__all__ = ["CkaEstimator", "CkaKernel", "InformationImbalanceEstimator", "StreamingCka"]
