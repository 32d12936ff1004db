"""ActivationStore: a dataset's activations written to memory-mapped files, read back lazily."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tdhook.errors import ContextStateError, InvalidInputError
from tdhook.latent import ActivationCaching, ActivationStore
from tdhook.latent.dimension import TwoNnDimensionEstimator
from tdhook.latent.stats import IncompatibleInputsError, InvalidParameterError, StreamingLinearRegression


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _store_dataset(model, x, path, num_samples, batch=37):
    with (
        ActivationStore(path, num_samples=num_samples) as store,
        ActivationCaching(r"[01]$").prepare(model) as hooked,
    ):
        for xb in x.split(batch):
            hooked(TensorDict(input=xb, batch_size=[len(xb)]))
            store.append(hooked.hooking_context.cache)
    return store


def test_round_trip_is_memory_mapped_and_exact(model, tmp_path) -> None:
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    store = _store_dataset(model, x, tmp_path / "acts", num_samples=400)  # room for more
    assert store.count == 300
    acts = ActivationStore.load(tmp_path / "acts")
    assert acts.batch_size == torch.Size([300])
    with torch.no_grad():
        torch.testing.assert_close(acts["0"], model[0](x))
        torch.testing.assert_close(acts["1"], model[1](model[0](x)))
    assert "count=300/400" in repr(store)


def test_estimators_read_the_store(model, tmp_path) -> None:
    """TwoNN on the memory-mapped points and a streaming probe over its batches equal in-memory fits."""
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(2))
    _store_dataset(model, x, tmp_path, num_samples=500)
    acts = ActivationStore.load(tmp_path)
    with torch.no_grad():
        hidden = model[1](model[0](x))
    on_disk = TwoNnDimensionEstimator()(TensorDict(data=acts["1"]))["dimension"]
    in_memory = TwoNnDimensionEstimator()(TensorDict(data=hidden))["dimension"]
    assert float(on_disk) == pytest.approx(float(in_memory), abs=1e-6)
    y = x[:, :2] ** 2
    streamed = StreamingLinearRegression()
    for chunk, yb in zip(acts.split(128), y.split(128)):
        streamed.partial_fit(chunk["1"], yb)
    whole = StreamingLinearRegression().fit(hidden, y)
    torch.testing.assert_close(streamed.coef_, whole.coef_)


def test_bad_input_says_what_to_do(model, tmp_path) -> None:
    with pytest.raises(InvalidParameterError, match="num_samples must be a positive int"):
        ActivationStore(tmp_path, num_samples=0)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="is not empty and holds no store"):
        ActivationStore(tmp_path, num_samples=10)
    with pytest.raises(InvalidInputError, match="is a file; pass a folder"):
        ActivationStore(tmp_path / "junk.txt", num_samples=10)
    with pytest.raises(InvalidInputError, match="No ActivationStore at"):
        ActivationStore.load(tmp_path)
    store = ActivationStore(tmp_path / "s", num_samples=10)
    with pytest.raises(InvalidInputError, match="expects a TensorDict of activations, got Tensor"):
        store.append(torch.zeros(3, 2))
    with pytest.raises(IncompatibleInputsError, match="same first \\(batch\\) dimension"):
        store.append(TensorDict(a=torch.zeros(3, 2), b=torch.zeros(4, 2)))
    store.append(TensorDict(a=torch.zeros(6, 2)))
    with pytest.raises(IncompatibleInputsError, match=r"got keys \['b'\] after batches with \['a'\]"):
        store.append(TensorDict(b=torch.zeros(2, 2)))
    with pytest.raises(
        IncompatibleInputsError,
        match=r"shape \(batch, 5\) and torch.float32, after batches with \(batch, 2\)",
    ):
        store.append(TensorDict(a=torch.zeros(2, 5)))
    with pytest.raises(IncompatibleInputsError, match="6 of 10 rows written, and this batch has 5"):
        store.append(TensorDict(a=torch.zeros(5, 2)))
    assert ActivationStore.load(tmp_path / "s")["a"].shape == (6, 2)  # the failed appends wrote nothing
    store.close()
    with pytest.raises(ContextStateError, match="is closed; open it again with resume=True"):
        store.append(TensorDict(a=torch.zeros(1, 2)))
    with pytest.raises(InvalidInputError, match="already holds a store; pass resume=True"):
        ActivationStore(tmp_path / "s", num_samples=10)
    with pytest.raises(InvalidParameterError, match="found a store of num_samples=10"):
        ActivationStore(tmp_path / "s", num_samples=12, resume=True)
    with pytest.raises(InvalidParameterError, match="not both"):
        ActivationStore(tmp_path / "s", num_samples=10, resume=True, overwrite=True)


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float64, torch.complex64, torch.bool, torch.int8, torch.int64],
)
def test_every_dtype_round_trips_bit_exactly(tmp_path, dtype) -> None:
    values = (torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    with ActivationStore(tmp_path, num_samples=8) as store:
        store.append(TensorDict(v=values[:4], empty=torch.zeros(4, 0), batch_size=[4]))
        store.append(TensorDict(v=values[4:4], empty=torch.zeros(0, 0), batch_size=[0]))  # zero rows: a no-op
        store.append(TensorDict(v=values[4:], empty=torch.zeros(2, 0), batch_size=[2]))
    acts = ActivationStore.load(tmp_path)
    assert acts["v"].dtype == dtype
    assert torch.equal(acts["v"], values)
    assert acts["empty"].shape == (6, 0)
