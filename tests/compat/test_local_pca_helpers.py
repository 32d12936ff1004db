"""tdhook 0.1's local-PCA helpers (addendum §1): closed forms, and scikit-learn's PCA as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from tensordict import TensorDict

from tdhook.latent.dimension_estimation import LocalPcaDimensionEstimator
from tdhook.latent.dimension_estimation.local_pca import (
    _dim_from_eigenvalues_maxgap,
    _dim_from_eigenvalues_ratio,
    _local_pca,
)


@pytest.mark.parametrize(
    ("eigenvalues", "expected"),
    [
        ([], 1),
        ([5.0], 1),
        ([4.0, 2.0, 1.0], 1),  # ratios 2, 2: the first maximum wins
        ([10.0, 9.0, 0.1, 0.05], 2),  # ratios 1.1, 90, 2
        ([3.0, 2.9, 2.8, 0.0], 3),  # λ/0 → λ/1e-15, the largest gap
        ([0.0, 0.0], 1),  # 0 / 1e-15 = 0 everywhere: argmax 0
    ],
)
def test_maxgap_closed_form(eigenvalues, expected) -> None:
    result = _dim_from_eigenvalues_maxgap(np.array(eigenvalues))
    assert result == expected
    assert isinstance(result, int)


@pytest.mark.parametrize(
    ("eigenvalues", "alpha", "expected"),
    [
        ([], 0.05, 1),
        ([1.0], 0.05, 1),
        ([1.0, 0.5, 0.04, 0.01], 0.05, 2),
        ([1.0, 0.05, 0.01], 0.05, 1),  # strictly greater: 0.05 is not counted
        ([1.0, 0.9, 0.8], 0.5, 3),
        ([0.0, 0.0], 0.05, 1),  # none above: at least 1
    ],
)
def test_ratio_closed_form(eigenvalues, alpha, expected) -> None:
    result = _dim_from_eigenvalues_ratio(np.array(eigenvalues), alpha)
    assert result == expected
    assert isinstance(result, int)


def _reference(points: np.ndarray, k: int, eps: float, criterion: str, alpha: float) -> np.ndarray:
    """Direct transcription of the addendum's wording, with scikit-learn's PCA."""
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    out = np.full(len(points), np.nan)
    for i in range(len(points)):
        order = [j for j in np.argsort(dist[i], kind="stable") if j != i and dist[i, j] > eps]
        if len(order) < k:
            continue
        lam = PCA(n_components=None).fit(points[[i, *order[:k]]]).explained_variance_
        if lam.size == 0:
            out[i] = 1.0
        elif criterion == "maxgap":
            out[i] = 1 if lam.size < 2 else np.argmax(lam[:-1] / (lam[1:] + 1e-15)) + 1
        else:
            out[i] = max(1, int((lam > alpha * lam[0]).sum()))
    return out


@pytest.mark.parametrize("criterion", ["maxgap", "ratio"])
def test_local_pca_matches_sklearn_reference(criterion) -> None:
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(60, 2)) @ rng.normal(size=(2, 5)) + 0.01 * rng.normal(size=(60, 5))
    data = torch.tensor(plane, dtype=torch.float32)
    result = _local_pca(data, 8, 1e-5, criterion, 0.05, PCA)
    assert result.dtype == torch.float32
    assert result.shape == (60,)
    expected = _reference(data.double().numpy(), 8, 1e-5, criterion, 0.05)
    np.testing.assert_array_equal(result.numpy(), expected.astype(np.float32))
    assert float(result.median()) == 2.0  # a noisy plane
    # The package's batched estimator gives the same estimates.
    batched = LocalPcaDimensionEstimator(k=8, criterion=criterion)(TensorDict(data=data))["dimension"]
    torch.testing.assert_close(batched, result)


def test_local_pca_duplicates_and_too_few_neighbours_give_nan() -> None:
    data = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    # k=4: each origin copy has only 3 neighbours farther than eps ((1,0), (0,1), (5,5)), so NaN;
    # the other points see all 5 others (the copies are each a valid neighbour of them).
    result = _local_pca(data, 4, 1e-5, "maxgap", 0.05, PCA)
    expected = _reference(data.double().numpy(), 4, 1e-5, "maxgap", 0.05)
    np.testing.assert_array_equal(result.numpy(), expected.astype(np.float32))
    assert torch.isnan(result[:3]).all()
    assert not torch.isnan(result[3:]).any()


def test_local_pca_uses_the_given_pca_class_in_float64() -> None:
    calls = []

    class RecordingPca:
        def __init__(self, n_components):
            calls.append(n_components)

        def fit(self, x):
            assert x.dtype == np.float64
            assert x.shape == (4, 3)  # the point and its k=3 neighbours
            self.explained_variance_ = np.array([])
            return self

    data = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    result = _local_pca(data, 3, 1e-5, "ratio", 0.05, RecordingPca)
    assert calls == [None] * 10
    torch.testing.assert_close(result, torch.ones(10))  # an empty spectrum gives 1


def test_local_pca_fewer_points_than_k_and_unknown_criterion() -> None:
    assert torch.isnan(_local_pca(torch.randn(3, 2), 3, 1e-5, "maxgap", 0.05, PCA)).all()
    with pytest.raises(ValueError, match="Unknown criterion: 'median'"):
        _local_pca(torch.randn(10, 2), 3, 1e-5, "median", 0.05, PCA)
