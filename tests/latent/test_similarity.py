"""CKA (batch and streaming) and information imbalance.

Oracles: the HSIC definitions with explicit centring matrices, dense distance matrices with a
stable argsort, and the invariances and limits that characterise each measure.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict

from tdhook.latent.similarity import CkaEstimator, CkaKernel, InformationImbalanceEstimator, StreamingCka
from tdhook.latent.stats import (
    DistributedNotInitializedError,
    IncompatibleInputsError,
    InsufficientSamplesError,
    InvalidParameterError,
    UnknownKernelError,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _orthogonal(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(dim, dim, seed=seed))
    return q


def _cka(a, b, **kw) -> torch.Tensor:
    return CkaEstimator(**kw)(TensorDict({"data_a": a, "data_b": b}))["cka"]


# ---------------------------------------------------------------- direct oracles


def _hsic_biased(k: torch.Tensor, l_mat: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - torch.full((n, n), 1.0 / n, dtype=k.dtype)
    return torch.trace(k @ h @ l_mat @ h)


def _cka_direct(k: torch.Tensor, l_mat: torch.Tensor) -> float:
    return float(_hsic_biased(k, l_mat) / torch.sqrt(_hsic_biased(k, k) * _hsic_biased(l_mat, l_mat)))


def _rbf_gram(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-(torch.cdist(x, x) ** 2) / (2 * sigma**2))


def _hsic_unbiased_loops(k: torch.Tensor, l_mat: torch.Tensor) -> float:
    """Song et al. (2012), eq. (5), written with explicit sums."""
    n = k.shape[0]
    kt = [[0.0 if i == j else float(k[i, j]) for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else float(l_mat[i, j]) for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(map(sum, kt))
    sum_l = sum(map(sum, lt))
    col_k = [sum(kt[i][j] for i in range(n)) for j in range(n)]
    row_l = [sum(lt[j]) for j in range(n)]
    cross = sum(col_k[j] * row_l[j] for j in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * cross) / (n * (n - 3))


# ---------------------------------------------------------------------- linear CKA


@pytest.mark.parametrize(("n", "da", "db"), [(200, 5, 7), (12, 30, 40)])  # feature and Gram paths
def test_linear_cka_matches_hsic_definition(n, da, db):
    a = _randn(n, da, seed=1)
    b = a[:, :1] ** 2 @ _randn(1, db, seed=2) + _randn(n, db, seed=3)
    expected = _cka_direct(a @ a.T, b @ b.T)
    got = _cka(a, b)
    assert got.dtype == torch.float32
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-5)
    feature_form = float((a - a.mean(0)).T.matmul(b - b.mean(0)).norm() ** 2)
    feature_form /= float(
        ((a - a.mean(0)).T @ (a - a.mean(0))).norm() * ((b - b.mean(0)).T @ (b - b.mean(0))).norm()
    )
    assert float(got) == pytest.approx(feature_form, rel=1e-5)


def test_linear_cka_invariances_and_limits():
    a = _randn(300, 10, seed=4)
    b = torch.tanh(a @ _randn(10, 6, seed=5))
    base = float(_cka(a, b))
    assert float(_cka(a @ _orthogonal(10, 6), b)) == pytest.approx(base, abs=1e-6)
    assert float(_cka(7.5 * a + 3.0, 0.1 * b @ _orthogonal(6, 7))) == pytest.approx(base, abs=1e-6)
    assert float(_cka(a, a)) == pytest.approx(1.0, abs=1e-6)
    independent = float(_cka(_randn(2000, 10, seed=8), _randn(2000, 10, seed=9)))
    assert 0 <= independent < 0.03
    assert math.isnan(float(_cka(torch.ones(50, 3), _randn(50, 3))))


def test_cka_batched_and_promotions():
    a = _randn(2, 3, 40, 4, seed=10)
    b = _randn(2, 3, 40, 6, seed=11)
    got = _cka(a, b)
    assert got.shape == (2, 3)
    assert float(got[1, 2]) == pytest.approx(float(_cka(a[1, 2], b[1, 2])), rel=1e-6)
    ints = torch.randint(0, 9, (30, 3))
    assert float(_cka(ints, ints)) == pytest.approx(1.0, abs=1e-6)
    empty = _cka(torch.zeros(0, 5, 3), torch.zeros(0, 5, 2))
    assert empty.shape == (0,)
    assert empty.dtype == torch.float32


# ------------------------------------------------------------------------- RBF CKA


def test_rbf_cka_matches_dense_definition_and_chunks():
    a = _randn(150, 4, seed=12)
    b = torch.sin(a @ _randn(4, 3, seed=13))
    expected = _cka_direct(_rbf_gram(a, 1.3), _rbf_gram(b, 1.3))
    assert float(_cka(a, b, kernel="rbf", sigma=1.3)) == pytest.approx(expected, rel=1e-5)
    assert float(_cka(a, b, kernel="rbf", sigma=1.3, chunk_size=7)) == pytest.approx(expected, rel=1e-5)
    # median heuristic, per view
    med_a = torch.cdist(a, a)[~torch.eye(150, dtype=torch.bool)].pow(2).median().sqrt()
    med_b = torch.cdist(b, b)[~torch.eye(150, dtype=torch.bool)].pow(2).median().sqrt()
    expected = _cka_direct(_rbf_gram(a, float(med_a)), _rbf_gram(b, float(med_b)))
    assert float(_cka(a, b, kernel=CkaKernel.RBF)) == pytest.approx(expected, rel=1e-5)
    assert float(_cka(a, a @ _orthogonal(4, 14), kernel="rbf")) == pytest.approx(1.0, abs=1e-6)


def test_unknown_kernel_is_not_implemented_and_value_error():
    with pytest.raises(NotImplementedError, match=r"Unsupported kernel 'poly'.*\['linear', 'rbf'\]") as info:
        CkaEstimator(kernel="poly")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, UnknownKernelError)
    with pytest.raises(NotImplementedError, match="'linear', 'rbf'"):
        StreamingCka(kernel="cosine")


def test_cka_repr_and_keys():
    est = CkaEstimator(in_key_a=("acts", "l1"), in_key_b=("acts", "l2"), out_key=("cka", "l1_l2"))
    assert est.in_keys == [("acts", "l1"), ("acts", "l2")]
    assert est.out_keys == [("cka", "l1_l2")]
    assert repr(CkaEstimator()) == (
        "CkaEstimator(in_keys=['data_a', 'data_b'], out_keys=['cka'], kernel='linear', eps=1e-12)"
    )
    td = est(TensorDict({"acts": {"l1": _randn(20, 3), "l2": _randn(20, 5, seed=1)}}))
    assert ("cka", "l1_l2") in td.keys(include_nested=True)


# ------------------------------------------------------------- shared validation


@pytest.mark.parametrize(
    "estimator", [CkaEstimator(), InformationImbalanceEstimator()], ids=["cka", "information_imbalance"]
)
def test_shared_validation_messages(estimator):
    method = "CKA" if isinstance(estimator, CkaEstimator) else "Information Imbalance"
    with pytest.raises(
        ValueError, match=rf"{method} expects tensors with shape \(N, D\) or \(\.\.\., N, D\)"
    ):
        estimator(TensorDict({"data_a": _randn(10), "data_b": _randn(10, 2)}))
    with pytest.raises(
        ValueError, match=r"Expected matching batch shapes, got \(2,\) at 'data_a' and \(3,\)"
    ):
        estimator(TensorDict({"data_a": _randn(2, 10, 2), "data_b": _randn(3, 10, 2)}))
    with pytest.raises(
        IncompatibleInputsError, match=r"Expected matching sample counts, got 10 at 'data_a' and 9"
    ):
        estimator(TensorDict({"data_a": _randn(10, 2), "data_b": _randn(9, 2)}))
    bad = _randn(10, 2)
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="'data_b' contains 1 non-finite"):
        estimator(TensorDict({"data_a": _randn(10, 2), "data_b": bad}))


# ------------------------------------------------------------- information imbalance


def _ii(a, b, **kw):
    td = InformationImbalanceEstimator(**kw)(TensorDict({"data_a": a, "data_b": b}))
    return td["information_imbalance_a_to_b"], td["information_imbalance_b_to_a"]


def _ii_direct(a: torch.Tensor, b: torch.Tensor, p: float) -> tuple[float, float]:
    n = a.shape[0]

    def ranks(x):
        d = torch.cdist(x, x, p=p, compute_mode="donot_use_mm_for_euclid_dist")
        d.fill_diagonal_(-1.0)  # self first (rank 0)
        order = d.argsort(dim=1, stable=True)
        r = torch.empty_like(order)
        r.scatter_(1, order, torch.arange(n).expand(n, n))
        return r, order[:, 1]

    rank_a, nn_a = ranks(a)
    rank_b, nn_b = ranks(b)
    a_to_b = 2 / n * sum(int(rank_b[i, nn_a[i]]) for i in range(n)) / n
    b_to_a = 2 / n * sum(int(rank_a[i, nn_b[i]]) for i in range(n)) / n
    return a_to_b, b_to_a


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_information_imbalance_matches_direct_reference(p):
    a = _randn(120, 3, seed=15)
    b = torch.cat([a[:, :1], _randn(120, 2, seed=16)], dim=1)
    b[5] = b[6]  # ties in B
    expected = _ii_direct(a, b, p)
    got = _ii(a, b, p=p)
    assert float(got[0]) == pytest.approx(expected[0], rel=1e-6)
    assert float(got[1]) == pytest.approx(expected[1], rel=1e-6)
    chunked = _ii(a, b, p=p, chunk_size=7)
    assert torch.equal(chunked[0], got[0])
    assert torch.equal(chunked[1], got[1])


def test_information_imbalance_limits():
    a = _randn(200, 4, seed=17)
    a_to_b, b_to_a = _ii(a, 3 * a @ _orthogonal(4, 18))
    assert float(a_to_b) == pytest.approx(2 / 200)
    assert float(b_to_a) == pytest.approx(2 / 200)
    assert a_to_b.dtype == torch.float32
    unrelated = _ii(_randn(500, 3, seed=19), _randn(500, 3, seed=20))
    assert 0.8 < float(unrelated[0]) < 1.2
    # B keeps only the first coordinate of A: A predicts B better than B predicts A
    b_coarse = a[:, :1]
    a_to_b, b_to_a = _ii(a, b_coarse)
    assert float(a_to_b) < float(b_to_a)
    padded = torch.cat([b_coarse, torch.zeros(200, 3, dtype=torch.float64)], dim=1)
    batched = _ii(torch.stack([a, a]), torch.stack([a, padded]))
    assert batched[0].shape == (2,)
    assert float(batched[0][1]) == pytest.approx(float(a_to_b))


def test_information_imbalance_errors_and_empty():
    with pytest.raises(InsufficientSamplesError, match="Expected at least 2 samples, got 1"):
        _ii(_randn(1, 2), _randn(1, 2))
    empty = _ii(torch.zeros(0, 4, 2), torch.zeros(0, 4, 3))
    assert empty[0].shape == (0,)
    assert empty[1].dtype == torch.float32


# ------------------------------------------------------------------- streaming CKA


def test_unbiased_hsic_matches_song_et_al_formula():
    x = _randn(9, 3, seed=21)
    y = _randn(9, 2, seed=22) + x[:, :2]
    cka = StreamingCka().update(x, y)
    state = cka.state()
    assert state["hsic_xy"].item() == pytest.approx(_hsic_unbiased_loops(x @ x.T, y @ y.T), rel=1e-10)
    assert state["hsic_xx"].item() == pytest.approx(_hsic_unbiased_loops(x @ x.T, x @ x.T), rel=1e-10)
    assert state["num_batches"].item() == 1


def test_streaming_cka_averages_minibatches():
    x = _randn(512, 6, seed=23)
    y = torch.tanh(x @ _randn(6, 4, seed=24)) + 0.3 * _randn(512, 4, seed=25)
    stream = StreamingCka()
    parts = []
    for xb, yb in zip(x.split(64), y.split(64)):
        stream.update(xb, yb)
        k, l_mat = xb @ xb.T, yb @ yb.T
        parts.append(
            [_hsic_unbiased_loops(k, l_mat), _hsic_unbiased_loops(k, k), _hsic_unbiased_loops(l_mat, l_mat)]
        )
    xy, xx, yy = (sum(p[i] for p in parts) / len(parts) for i in range(3))
    assert stream.num_batches == 8
    assert float(stream.compute()) == pytest.approx(xy / math.sqrt(xx * yy), rel=1e-8)
    # unbiased minibatch CKA approaches the full-data CKA, and is rotation/scale invariant
    assert float(stream.compute()) == pytest.approx(float(_cka(x, y)), abs=0.05)
    rotated = StreamingCka()
    for xb, yb in zip(x.split(64), y.split(64)):
        rotated.update(2 * xb @ _orthogonal(6, 26), yb)
    assert float(rotated.compute()) == pytest.approx(float(stream.compute()), rel=1e-8)
    same = StreamingCka("rbf", sigma=2.0)
    for xb in x.split(128):
        same.update(xb, xb)
    assert float(same.compute()) == pytest.approx(1.0, abs=1e-9)


def test_streaming_cka_errors():
    with pytest.raises(InsufficientSamplesError, match="at least 4 samples"):
        StreamingCka().update(_randn(3, 2), _randn(3, 2))
    with pytest.raises(IncompatibleInputsError, match="same number of samples"):
        StreamingCka().update(_randn(8, 2), _randn(7, 2))
    with pytest.raises(InsufficientSamplesError, match="call update"):
        StreamingCka().compute()
    with pytest.raises(DistributedNotInitializedError, match="init_process_group") as info:
        StreamingCka().update(_randn(8, 2), _randn(8, 2)).all_reduce()
    assert isinstance(info.value, RuntimeError)


def test_reference_import_path():
    from tdhook.latent import representation_similarity

    assert representation_similarity.CkaEstimator is CkaEstimator
    assert representation_similarity.InformationImbalanceEstimator is InformationImbalanceEstimator


@pytest.mark.parametrize(
    ("cls", "method"), [(CkaEstimator, "CKA"), (InformationImbalanceEstimator, "Information")]
)
def test_zero_rows_or_zero_features_give_a_clear_error_and_an_empty_batch_an_empty_result(
    cls, method
) -> None:
    with pytest.raises(InsufficientSamplesError, match=rf"{method}.* got 0 samples at 'data_a' and 'data_b'"):
        cls()(TensorDict(data_a=torch.zeros(0, 3), data_b=torch.zeros(0, 2)))
    with pytest.raises(IncompatibleInputsError, match=rf"{method}.* got 0 features at 'data_b'"):
        cls()(TensorDict(data_a=torch.randn(10, 3), data_b=torch.zeros(10, 0)))
    out = cls()(TensorDict(data_a=torch.zeros(0, 5, 3), data_b=torch.zeros(0, 5, 2)))
    assert all(v.shape == (0,) for k, v in out.items() if k not in ("data_a", "data_b"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": float("nan")}, "eps must be a finite number >= 0, got nan"),
        ({"eps": -1.0}, "eps must be a finite number >= 0, got -1.0"),
        ({"eps": "tiny"}, "eps must be a finite number >= 0, got 'tiny'"),
        ({"kernel": "rbf", "sigma": float("nan")}, "sigma must be a finite number > 0, got nan"),
        ({"kernel": "rbf", "sigma": float("inf")}, "sigma must be a finite number > 0, got inf"),
        ({"kernel": "rbf", "sigma": 0.0}, "sigma must be a finite number > 0, got 0.0"),
    ],
)
def test_cka_parameter_ranges_are_checked_at_construction(kwargs, message) -> None:
    for cls in (CkaEstimator, StreamingCka):
        with pytest.raises(InvalidParameterError, match=message):
            cls(**kwargs)
