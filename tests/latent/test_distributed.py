"""``all_reduce`` across two real CPU processes (gloo) equals the single-process result.

Each rank feeds half of the data to every streaming accumulator, calls ``all_reduce()``, and
saves its state; the parent compares both ranks with one process fitted on all the data.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tdhook.latent.similarity import StreamingCka
from tdhook.latent.stats import StreamingLinearRegression, StreamingLogisticRegression, StreamingMoments

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is unavailable",
)

WORLD_SIZE = 2


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = 3.0 + torch.randn(400, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        400, 2, generator=g, dtype=torch.float64
    )
    labels = (x[:, 0] + x[:, 1] > 6.0).long()
    return {
        "x": x,
        "y": y,
        "labels": labels,
        "z": torch.tanh(x @ torch.randn(6, 4, generator=g, dtype=torch.float64)),
    }


def _fit(rows: slice) -> dict[str, object]:
    data = {k: v[rows] for k, v in _data().items()}
    moments = StreamingMoments()
    ols = StreamingLinearRegression()
    ridge = StreamingLinearRegression(alpha=2.0)
    cka = StreamingCka()
    logistic = StreamingLogisticRegression(epochs=2, random_state=0)
    for x, y, z, labels in zip(*(data[k].split(50) for k in ("x", "y", "z", "labels"))):
        moments.update(x)
        ols.partial_fit(x, y)
        ridge.partial_fit(x, y)
        cka.update(x, z)
        logistic.partial_fit(x, labels, classes=[0, 1])
    return {"moments": moments, "ols": ols, "ridge": ridge, "cka": cka, "logistic": logistic}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),  # a stuck peer fails the test instead of hanging it
    )
    try:
        half = 400 // WORLD_SIZE
        models = _fit(slice(rank * half, (rank + 1) * half))
        for model in models.values():
            model.all_reduce()
        result = {
            "moments": models["moments"].state(),
            "ols_coef": models["ols"].coef_,
            "ols_intercept": models["ols"].intercept_,
            "ridge_coef": models["ridge"].coef_,
            "cka": models["cka"].compute(),
            "logistic": models["logistic"].state(),
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_all_reduce_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    single = _fit(slice(0, 400))
    for got in ranks:
        for key, value in single["moments"].state().items():
            torch.testing.assert_close(got["moments"][key], value, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got["ols_coef"], single["ols"].coef_, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got["ols_intercept"], single["ols"].intercept_, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got["ridge_coef"], single["ridge"].coef_, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got["cka"], single["cka"].compute(), rtol=1e-12, atol=1e-12)
        assert got["logistic"]["n_samples_seen"].item() == 400
    # model averaging: both ranks hold the same (averaged) logistic parameters
    torch.testing.assert_close(ranks[0]["logistic"]["weight"], ranks[1]["logistic"]["weight"], rtol=0, atol=0)
