"""Intrinsic-dimension estimators of point clouds (activations), as TensorDict modules.

Each estimator reads ``(N, D)`` or ``(..., N, D)`` points from a TensorDict (key ``"data"``) and
writes its estimate (key ``"dimension"``); each leading index is a separate dataset. All share
:func:`knn`, an exact nearest-neighbour search computed in row chunks, so memory stays
``O(N·k)`` instead of the ``N × N`` distance matrix of tdhook 0.1.

* :class:`TwoNnDimensionEstimator`: one global estimate per dataset (Facco et al., 2017).
* :class:`LocalKnnDimensionEstimator`: per point, from k-th and 2k-th neighbour distances.
* :class:`LocalPcaDimensionEstimator`: per point, from the local PCA spectrum.
* :class:`CaPcaDimensionEstimator`: per point, curvature-adjusted local PCA.
"""

from __future__ import annotations

from ._knn import KnnResult, knn
from ._local_knn import LocalKnnDimensionEstimator
from ._pca import CaPcaDimensionEstimator, LocalPcaDimensionEstimator, PcaCriterion
from ._twonn import TwoNnDimensionEstimator

__all__ = [
    "CaPcaDimensionEstimator",
    "KnnResult",
    "LocalKnnDimensionEstimator",
    "LocalPcaDimensionEstimator",
    "PcaCriterion",
    "TwoNnDimensionEstimator",
    "knn",
]
