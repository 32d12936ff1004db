"""TwoNN intrinsic dimension: tdhook's chunked exact kNN vs tdhook 0.1's algorithm vs a dense cdist.

Points: ``N × dim`` samples of a smooth 10-dimensional manifold (``tanh(z W₁) W₂``), seeded.

- ``tdhook``: ``TwoNnDimensionEstimator()`` (chunked exact kNN, ``O(N·k)`` memory);
- ``reference``: tdhook 0.1's arithmetic (a full ``torch.cdist`` row, self and duplicates masked,
  a full ``torch.sort`` per point), run in blocks of 2,000 rows so that large N still fit;
- ``dense``: one N × N ``cdist`` and NumPy's in-place SIMD row sort (a lean dense baseline whose
  peak is ``5·N²`` bytes: 12.5 GB at N = 50k). Sizes whose matrix would pass ``DENSE_CAP_GB``
  are skipped rather than pushed into the OOM killer.

The gate compares the three estimates (one float each).
"""

from __future__ import annotations

import math

import torch

from .._harness import Case, Impl, Skip, Task

LATENT_DIM = 10
EPS = 1e-5
#: The largest dense distance matrix (with its mask) a case may allocate.
DENSE_CAP_GB = 16.0


def manifold_points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of a smooth ``LATENT_DIM``-dimensional manifold in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, LATENT_DIM, generator=g)
    w1 = torch.randn(LATENT_DIM, dim, generator=g) / math.sqrt(LATENT_DIM)
    w2 = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    return torch.tanh(z @ w1) @ w2


def _two_nn_fit(first_two: torch.Tensor) -> torch.Tensor:
    """TwoNN's line fit through the origin from each point's two neighbour distances ``(N, 2)``."""
    mu = first_two[:, 1].double() / first_two[:, 0].double()
    mu = mu[torch.isfinite(mu)].sort().values
    n = mu.numel()
    xs = torch.log(mu[:-1])
    ys = -torch.log1p(-torch.arange(1, n, dtype=torch.float64) / n)
    return (xs * ys).sum() / (xs * xs).sum()


def _masked_distances(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    d = torch.cdist(x[start:stop], x)
    d[torch.arange(stop - start), torch.arange(start, stop)] = math.inf  # self
    return d.masked_fill_(d <= EPS, math.inf)  # duplicates


class Tdhook(Impl):
    """``TwoNnDimensionEstimator()(TensorDict({"data": x}))["dimension"]``."""

    name = "tdhook"
    label = "tdhook TwoNnDimensionEstimator (chunked kNN)"

    def setup(self, params):
        from tensordict import TensorDict

        from tdhook.latent.dimension import TwoNnDimensionEstimator

        self.td = TensorDict({"data": manifold_points(params["n"], params["dim"])})
        self.estimator = TwoNnDimensionEstimator(eps=EPS)

    def run(self):
        self.dimension = self.estimator(self.td)["dimension"]

    def output(self):
        return self.dimension.double().reshape(())


class Reference(Impl):
    """tdhook 0.1's algorithm: a full distance row and a full ``torch.sort`` per point (row blocks)."""

    name = "reference"
    label = "tdhook 0.1's algorithm (cdist row + full sort)"
    rows = 2000

    def setup(self, params):
        self.x = manifold_points(params["n"], params["dim"])

    def run(self):
        n = self.x.shape[0]
        first_two = torch.cat(
            [
                _masked_distances(self.x, i, min(n, i + self.rows)).sort(dim=1).values[:, :2]
                for i in range(0, n, self.rows)
            ]
        )
        self.dimension = _two_nn_fit(first_two)

    def output(self):
        return self.dimension


class Dense(Impl):
    """One N × N ``cdist``, rows sorted in place by NumPy (no index array)."""

    name = "dense"
    label = "dense N × N cdist + NumPy row sort"

    def setup(self, params):
        n = params["n"]
        need_gb = 5 * n * n / 2**30  # float32 distances + their boolean mask
        if need_gb > DENSE_CAP_GB:
            raise Skip(f"needs ≈{need_gb:.0f} GB for the dense matrix (cap {DENSE_CAP_GB:g} GB)")
        self.x = manifold_points(n, params["dim"])

    def run(self):
        d = _masked_distances(self.x, 0, self.x.shape[0])
        rows = d.numpy()
        rows.sort(axis=1)
        first_two = torch.from_numpy(rows[:, :2].copy())
        del d, rows
        self.dimension = _two_nn_fit(first_two)

    def output(self):
        return self.dimension


def _case(n: int, quick: bool = True, smoke: dict | None = None) -> Case:
    return Case(f"N={n:,} dim=128", {"n": n, "dim": 128}, quick=quick, smoke=smoke)


TASK = Task(
    name="twonn_dense",
    title="TwoNN intrinsic dimension on N × 128 points: chunked kNN vs tdhook 0.1's algorithm and a dense cdist",
    env="tdhook",
    impls=[Tdhook, Reference, Dense],
    cases=[
        _case(5000, smoke={"n": 300, "dim": 16}),
        _case(10000, quick=False),
        _case(20000),
        _case(50000, quick=False),
    ],
    rtol=1e-6,
    atol=1e-6,  # the same neighbour distances up to float32 rounding: one estimate each
    targets={"reference": 1.0},
    timing={"warmup": 1, "min_repeats": 3, "max_repeats": 10, "budget_s": 20.0},
    notes="peak RSS is the point here: ours stays O(N·k), the dense run needs 5·N² bytes.",
)
