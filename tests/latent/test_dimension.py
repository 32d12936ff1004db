"""Intrinsic-dimension estimators and the chunked kNN search.

Oracles: manifolds of known dimension; slow direct references written here from the method
definitions (dense distance matrix + Python loops over points, scikit-learn PCA for the local
spectra); chunked results equal to unchunked ones bit for bit.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from tensordict import TensorDict

from tdhook.errors import MissingKeyError
from tdhook.latent.dimension import (
    CaPcaDimensionEstimator,
    LocalKnnDimensionEstimator,
    LocalPcaDimensionEstimator,
    PcaCriterion,
    TwoNnDimensionEstimator,
    knn,
)
from tdhook.latent.stats import (
    IncompatibleInputsError,
    InsufficientSamplesError,
    InvalidParameterError,
    NonFiniteInputError,
)

# --------------------------------------------------------------------------- data


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(dim: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q


def plane_10d(n: int = 2000, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 10, generator=g, dtype=torch.float64
    )


def circle(n: int = 2000, ambient: int = 2, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    t = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    pts = torch.zeros(n, ambient, dtype=torch.float64)
    pts[:, 0], pts[:, 1] = t.cos(), t.sin()
    return pts @ _rotation(ambient, g)


def sphere(n: int = 3000, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 3, generator=_gen(seed), dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def swiss_roll(n: int = 3000, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    h = 21 * torch.rand(n, generator=g, dtype=torch.float64)
    return torch.stack([t * t.cos(), h, t * t.sin()], dim=1)


def ball(n: int = 4000, d: int = 5, ambient: int = 20, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / d)
    return torch.cat([x, torch.zeros(n, ambient - d, dtype=torch.float64)], dim=1) @ _rotation(ambient, g)


def _estimate(estimator, x: torch.Tensor) -> torch.Tensor:
    return estimator(TensorDict({"data": x}))["dimension"]


# ------------------------------------------------------------------ known manifolds

MANIFOLDS = {
    "plane_in_10d": (plane_10d, 2),
    "circle_in_2d": (circle, 1),
    "sphere": (sphere, 2),
    "swiss_roll": (swiss_roll, 2),
    "5_ball_in_20d": (ball, 5),
}


@pytest.mark.parametrize("name", list(MANIFOLDS))
def test_two_nn_recovers_known_dimension(name):
    make, dim = MANIFOLDS[name]
    estimate = float(_estimate(TwoNnDimensionEstimator(), make()))
    assert abs(estimate - dim) <= 0.1 * dim + 0.1, estimate


@pytest.mark.parametrize("name", list(MANIFOLDS))
def test_local_knn_median_recovers_known_dimension(name):
    make, dim = MANIFOLDS[name]
    per_point = _estimate(LocalKnnDimensionEstimator(k=10), make())
    assert abs(float(per_point.nanmedian()) - dim) <= 0.1 * dim + 0.1


@pytest.mark.parametrize("name", list(MANIFOLDS))
@pytest.mark.parametrize("criterion", ["maxgap", "ratio"])
def test_local_pca_median_recovers_known_dimension(name, criterion):
    make, dim = MANIFOLDS[name]
    per_point = _estimate(LocalPcaDimensionEstimator(k=20, criterion=criterion), make())
    assert float(per_point.median()) == dim


@pytest.mark.parametrize("name", list(MANIFOLDS))
def test_ca_pca_median_recovers_known_dimension(name):
    make, dim = MANIFOLDS[name]
    per_point = _estimate(CaPcaDimensionEstimator(k=20), make())
    assert float(per_point.median()) == dim


def test_circle_in_10d_local_estimators():
    x = circle(ambient=10)
    assert abs(float(_estimate(TwoNnDimensionEstimator(), x)) - 1) < 0.15
    assert float(_estimate(CaPcaDimensionEstimator(k=20), x).median()) == 1
    assert float(_estimate(LocalPcaDimensionEstimator(k=20, criterion="ratio"), x).median()) == 1


# ----------------------------------------------------------- slow direct references


def _dense_sorted_neighbours(x: torch.Tensor, eps: float | None) -> list[list[tuple[float, int]]]:
    """For each point, its (distance, index) pairs, valid only, sorted; dense and loop-based."""
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    out = []
    for i in range(x.shape[0]):
        row = [
            (float(d[i, j]), j) for j in range(x.shape[0]) if j != i and (eps is None or float(d[i, j]) > eps)
        ]
        out.append(sorted(row))
    return out


def _reference_two_nn(x: torch.Tensor, eps: float) -> tuple[float, list[float], list[float]]:
    mus = []
    for row in _dense_sorted_neighbours(x, eps):
        if len(row) >= 2:
            mus.append(row[1][0] / row[0][0])
    mus.sort()
    n = len(mus)
    xs = [math.log(m) for m in mus[:-1]]
    ys = [-math.log(1 - (i + 1) / n) for i in range(n - 1)]
    slope = sum(a * b for a, b in zip(xs, ys)) / sum(a * a for a in xs)
    return slope, xs, ys


def _data_with_duplicates(n: int = 80, dim: int = 4, seed: int = 1) -> torch.Tensor:
    x = torch.randn(n, dim, generator=_gen(seed), dtype=torch.float64)
    x[10] = x[3]
    x[11] = x[3] + 1e-7  # within eps of x[3]
    x[20] = x[21]
    return x


def test_two_nn_matches_direct_reference_with_xy():
    x = _data_with_duplicates()
    td = TwoNnDimensionEstimator(return_xy=True)(TensorDict({"data": x}))
    slope, xs, ys = _reference_two_nn(x, 1e-5)
    assert td["dimension"].dtype == torch.float32
    assert float(td["dimension"]) == pytest.approx(slope, rel=1e-5)
    assert td["dimension_x"].shape == (x.shape[0] - 1,)
    got_x, got_y = td["dimension_x"], td["dimension_y"]
    n_used = len(xs)
    torch.testing.assert_close(
        got_x[:n_used].double(), torch.tensor(xs, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        got_y[:n_used].double(), torch.tensor(ys, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    assert torch.isnan(got_x[n_used:]).all()
    assert torch.isnan(got_y[n_used:]).all()


def test_local_knn_matches_direct_reference():
    x = _data_with_duplicates()
    k = 4
    got = _estimate(LocalKnnDimensionEstimator(k=k), x)
    expected = []
    for row in _dense_sorted_neighbours(x, 1e-5):
        r_k, r_2k = row[k - 1][0], row[2 * k - 1][0]
        expected.append(math.log(2) / math.log(r_2k / r_k) if r_2k > r_k else math.nan)
    torch.testing.assert_close(
        got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def _sklearn_spectrum(points: torch.Tensor):
    decomposition = pytest.importorskip("sklearn.decomposition")
    return decomposition.PCA().fit(points.numpy()).explained_variance_


@pytest.mark.parametrize("criterion", ["maxgap", "ratio"])
@pytest.mark.parametrize("dim", [3, 12])  # fewer and more dimensions than neighbourhood points
def test_local_pca_matches_sklearn_reference(criterion, dim):
    x = _data_with_duplicates(n=60, dim=dim)
    k, alpha = 6, 0.05
    got = _estimate(LocalPcaDimensionEstimator(k=k, criterion=criterion, alpha=alpha), x)
    assert got.dtype == torch.float64
    expected = []
    for i, row in enumerate(_dense_sorted_neighbours(x, 1e-5)):
        hood = x[[i] + [j for _, j in row[:k]]]
        lam = _sklearn_spectrum(hood)
        if criterion == "maxgap":
            value = 1 if len(lam) < 2 else int((lam[:-1] / (lam[1:] + 1e-15)).argmax()) + 1
        else:
            value = max(1, int((lam > alpha * lam[0]).sum()))
        expected.append(float(value))
    assert got.tolist() == expected


def _reference_ca_pca(lam_hat: list[float], dim: int) -> int:
    best, best_d = math.inf, 1
    for d in range(1, dim + 1):
        tail = sum(lam_hat[d:])
        lam_d = [lam_hat[i] + (3 * d + 4) / (d * (d + 4)) * tail for i in range(d)] + [0.0] * (dim - d)
        target = [1 / (d + 2)] * d + [0.0] * (dim - d)
        score = math.sqrt(sum((t - v) ** 2 for t, v in zip(target, lam_d))) + 2 * tail
        if score < best:
            best, best_d = score, d
    return best_d


@pytest.mark.parametrize("dim", [3, 10])
def test_ca_pca_matches_direct_reference(dim):
    g = _gen(3)
    latent = torch.randn(70, 2, generator=g, dtype=torch.float64)
    bump = 0.05 * (latent**2).sum(1, keepdim=True)
    x = torch.cat([latent, bump, torch.zeros(70, dim - 3, dtype=torch.float64)], dim=1)
    x = x + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    k = 8
    got = _estimate(CaPcaDimensionEstimator(k=k), x)
    expected = []
    for row in _dense_sorted_neighbours(x, 1e-5):
        r = 0.5 * (row[k - 1][0] + row[k][0])
        hood = x[[j for _, j in row[: k + 1]]]
        lam = list(_sklearn_spectrum(hood) / r**2)
        lam += [0.0] * (dim - len(lam))
        expected.append(float(_reference_ca_pca(lam, dim)))
    assert got.tolist() == expected


# -------------------------------------------------------------------- chunking / knn

ESTIMATORS = [
    lambda c: TwoNnDimensionEstimator(chunk_size=c, return_xy=True),
    lambda c: LocalKnnDimensionEstimator(k=5, chunk_size=c),
    lambda c: LocalPcaDimensionEstimator(k=7, chunk_size=c),
    lambda c: CaPcaDimensionEstimator(k=7, chunk_size=c),
]


@pytest.mark.parametrize("make", ESTIMATORS)
def test_chunked_equals_unchunked(make):
    x = _data_with_duplicates(n=300, dim=6).to(torch.float32)
    full = make(None)(TensorDict({"data": x}))
    results = set(full.keys(include_nested=True, leaves_only=True)) - {"data"}
    assert results, "the estimator wrote no result key: nothing would be compared"
    for chunk in (1, 7, 64):
        chunked = make(chunk)(TensorDict({"data": x}))
        assert set(chunked.keys(include_nested=True, leaves_only=True)) - {"data"} == results, chunk
        for key in results:
            assert torch.equal(full[key].nan_to_num(-1.0), chunked[key].nan_to_num(-1.0)), (key, chunk)


@pytest.mark.parametrize("p", [2.0, 1.0])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_knn_matches_dense_sort(p, eps):
    x = torch.randn(500, 8, generator=_gen(4))
    x[100] = x[5]
    x[101] = x[5] + 1e-7
    got = knn(x, 6, eps=eps, p=p, chunk_size=33)
    d = torch.cdist(x.double(), x.double(), p=p, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    if eps is not None:
        d[d <= eps] = math.inf
    dist, idx = d.sort(dim=1, stable=True)
    assert torch.equal(got.indices, idx[:, :6])
    torch.testing.assert_close(got.distances, dist[:, :6].float())


def test_knn_breaks_exact_ties_by_lower_index():
    lattice = torch.stack(torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij"), -1).reshape(
        -1, 2
    )
    lattice = lattice[torch.randperm(144, generator=_gen(8))]  # every point has 4 neighbours at distance 1
    d = torch.cdist(lattice.double(), lattice.double())
    d.fill_diagonal_(math.inf)
    _, idx = d.sort(dim=1, stable=True)
    for chunk in (None, 13):
        assert torch.equal(knn(lattice, 6, chunk_size=chunk).indices, idx[:, :6])


def test_knn_duplicates_crowding_candidates_fall_back_to_exact_search():
    # every point has 29 exact copies: more than the candidate margin
    x = torch.randn(20, 3, generator=_gen(5)).repeat(30, 1)
    got = knn(x, 3, eps=1e-5)
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(math.inf)
    d[d <= 1e-5] = math.inf
    _dist, idx = d.sort(dim=1, stable=True)
    assert torch.equal(got.indices, idx[:, :3])
    # fewer valid neighbours than k: inf distances and -1 indices
    few = knn(torch.zeros(5, 2).index_fill_(0, torch.tensor([0]), 1.0), 2, eps=1e-5)
    assert torch.isinf(few.distances[1:, 1]).all()
    assert (few.indices[1:, 1] == -1).all()


def test_knn_batched_equals_per_dataset_and_validates():
    x = torch.randn(3, 100, 4, generator=_gen(6))
    got = knn(x, 3)
    for b in range(3):
        single = knn(x[b], 3)
        assert torch.equal(got.indices[b], single.indices)
    with pytest.raises(InsufficientSamplesError, match=r"k\+1 = 5 points"):
        knn(torch.randn(4, 2), 4)
    bad = torch.randn(10, 2)
    bad[3, 1] = math.nan
    with pytest.raises(NonFiniteInputError, match="1 non-finite"):
        knn(bad, 2)


@pytest.mark.slow
def test_knn_memory_stays_bounded_without_dense_matrix():
    """16k points: a dense float32 distance matrix alone would take 1 GB."""
    script = textwrap.dedent(
        """
        import resource, torch
        from tdhook.latent.dimension import knn
        torch.manual_seed(0)
        x = torch.randn(16000, 16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        knn(x, 2, eps=1e-5)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown_mb = float(out.stdout.strip().splitlines()[-1])
    assert grown_mb < 500, grown_mb


# --------------------------------------------------------------- module behaviour


def test_batched_datasets_are_estimated_separately():
    x = torch.stack([plane_10d(300, seed=s) for s in range(3)]).reshape(3, 1, 300, 10)
    td = TensorDict({"data": x}, batch_size=[3, 1])
    out = TwoNnDimensionEstimator(return_xy=True)(td)
    assert out is td
    assert out["dimension"].shape == (3, 1)
    assert out["dimension_x"].shape == (3, 1, 299)
    for s in range(3):
        single = float(_estimate(TwoNnDimensionEstimator(), x[s, 0]))
        assert float(out["dimension"][s, 0]) == pytest.approx(single, rel=1e-6)
    local = LocalKnnDimensionEstimator(k=5)(TensorDict({"data": x}, batch_size=[3, 1]))["dimension"]
    assert local.shape == (3, 1, 300)


def test_keys_repr_and_dtypes():
    est = TwoNnDimensionEstimator(in_key=("acts", "layer1"), out_key=("dim", "layer1"), return_xy=True)
    assert est.in_keys == [("acts", "layer1")]
    assert est.out_keys == [("dim", "layer1"), ("dim", "layer1_x"), ("dim", "layer1_y")]
    td = est(TensorDict({"acts": {"layer1": plane_10d(200)}}))
    assert ("dim", "layer1_y") in td.keys(include_nested=True)
    assert (
        repr(TwoNnDimensionEstimator())
        == "TwoNnDimensionEstimator(in_keys=['data'], out_keys=['dimension'], eps=1e-05)"
    )
    assert "k='auto'" in repr(LocalKnnDimensionEstimator())
    assert "eps=1e-05" in repr(LocalKnnDimensionEstimator())
    assert "criterion='maxgap'" in repr(LocalPcaDimensionEstimator())
    assert "k=5" in repr(CaPcaDimensionEstimator(k=5))
    assert LocalPcaDimensionEstimator(criterion=PcaCriterion.RATIO).criterion is PcaCriterion.RATIO
    ints = torch.randint(0, 50, (200, 5), generator=_gen(7))
    assert _estimate(TwoNnDimensionEstimator(), ints).dtype == torch.float32
    assert _estimate(LocalPcaDimensionEstimator(k=5), ints).dtype == torch.float32
    assert _estimate(CaPcaDimensionEstimator(k=5), plane_10d(100)).dtype == torch.float64


def test_auto_k_matches_reference_formula():
    x = plane_10d(101)
    # auto k = max(2, min(isqrt(101)=10, 50)) = 10: needs 2k+1 = 21 points
    auto = _estimate(LocalKnnDimensionEstimator(), x)
    explicit = _estimate(LocalKnnDimensionEstimator(k=10), x)
    assert torch.equal(auto.nan_to_num(-1), explicit.nan_to_num(-1))
    with pytest.raises(ValueError, match=r"At least 2k\+1 points required for local KNN \(k=2\), got 4"):
        _estimate(LocalKnnDimensionEstimator(), torch.randn(4, 2))


# ------------------------------------------------------------------------- errors


def test_too_few_points_errors():
    with pytest.raises(ValueError, match="At least 3 points required for Two NN dimension estimation"):
        _estimate(TwoNnDimensionEstimator(), torch.randn(2, 3))
    with pytest.raises(ValueError, match="At least 3 valid points required") as info:
        _estimate(TwoNnDimensionEstimator(), torch.ones(10, 3))
    assert isinstance(info.value, InsufficientSamplesError)
    assert "eps=1e-05" in str(info.value)
    with pytest.raises(ValueError, match=r"At least 2k\+1 points required for local KNN \(k=5\), got 10"):
        _estimate(LocalKnnDimensionEstimator(k=5), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"At least k\+1 points required for local PCA \(k=5\), got 5"):
        _estimate(LocalPcaDimensionEstimator(k=5), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"At least k\+2 points required for CA-PCA \(k=5\), got 6"):
        _estimate(CaPcaDimensionEstimator(k=5), torch.randn(6, 3))


def test_bad_k_and_criterion():
    with pytest.raises(ValueError, match="k must be greater than 1"):
        LocalKnnDimensionEstimator(k=1)
    with pytest.raises(TypeError, match="k must be an int or 'auto'"):
        LocalKnnDimensionEstimator(k=2.5)
    with pytest.raises(TypeError, match="k must be an int or 'auto'"):
        LocalPcaDimensionEstimator(k="many")
    with pytest.raises(ValueError, match="k must be at least 1"):
        LocalPcaDimensionEstimator(k=0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        CaPcaDimensionEstimator(k=0)
    with pytest.raises(ValueError, match=r"Unknown criterion: 'gap'.*\['maxgap', 'ratio'\]"):
        LocalPcaDimensionEstimator(criterion="gap")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_input_names_the_key(value):
    x = plane_10d(50)
    x[7, 2] = value
    for est in (TwoNnDimensionEstimator(in_key="acts"), LocalPcaDimensionEstimator(k=3, in_key="acts")):
        with pytest.raises(ValueError, match="'acts' contains 1 non-finite value"):
            est(TensorDict({"acts": x}))


def test_missing_key_and_bad_rank():
    with pytest.raises(MissingKeyError, match=r"reads 'data'.*keys present: \['other'\]"):
        TwoNnDimensionEstimator()(TensorDict({"other": torch.randn(5, 2)}))
    with pytest.raises(ValueError, match=r"shape \(N, D\) or \(\.\.\., N, D\).*got shape \(5,\)"):
        TwoNnDimensionEstimator()(TensorDict({"data": torch.randn(5)}))


def test_reference_import_path():
    from tdhook.latent import dimension_estimation

    assert dimension_estimation.TwoNnDimensionEstimator is TwoNnDimensionEstimator
    assert dimension_estimation.CaPcaDimensionEstimator is CaPcaDimensionEstimator
    assert set(dimension_estimation.__all__) == {
        "TwoNnDimensionEstimator",
        "LocalKnnDimensionEstimator",
        "LocalPcaDimensionEstimator",
        "CaPcaDimensionEstimator",
    }


@pytest.mark.parametrize(
    "cls",
    [
        TwoNnDimensionEstimator,
        LocalKnnDimensionEstimator,
        LocalPcaDimensionEstimator,
        CaPcaDimensionEstimator,
    ],
)
def test_zero_rows_or_zero_features_give_a_clear_error_and_an_empty_batch_an_empty_result(cls) -> None:
    with pytest.raises(InsufficientSamplesError, match="got 0"):
        cls()(TensorDict(data=torch.zeros(0, 3)))
    with pytest.raises(IncompatibleInputsError, match=r"0 features at 'data' \(shape \(10, 0\)\)"):
        cls()(TensorDict(data=torch.zeros(10, 0)))
    out = cls()(TensorDict(data=torch.zeros(0, 5, 3), batch_size=[]))["dimension"]
    assert out.shape[0] == 0


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1.0, "1e-5", True])
def test_eps_must_be_finite_and_non_negative(eps) -> None:
    with pytest.raises(InvalidParameterError, match="eps must be a finite number >= 0"):
        TwoNnDimensionEstimator(eps=eps)
    with pytest.raises(InvalidParameterError, match="eps must be a finite number >= 0"):
        knn(torch.randn(5, 2), 1, eps=eps)


@pytest.mark.parametrize("alpha", [float("nan"), -0.1, 1.5, float("inf"), "0.05"])
def test_local_pca_alpha_is_a_fraction(alpha) -> None:
    with pytest.raises(InvalidParameterError, match=r"alpha must be a finite number >= 0 and <= 1, got"):
        LocalPcaDimensionEstimator(criterion="ratio", alpha=alpha)
