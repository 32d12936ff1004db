"""Representation-analysis benchmarks: chunked TwoNN vs dense cdist, streaming ridge probes vs sklearn.

Every measurement runs in its own subprocess (``--child ...``), so peak RSS
(``resource.getrusage(...).ru_maxrss``) belongs to that one computation; the table reports the
peak above the RSS measured after the data were created. Times are wall clock and process CPU
time. On a shared, loaded machine multi-threaded runs stall at every parallel region (and spin,
inflating CPU time too): ``--threads 1`` gives the stable comparison of work.

1. TwoNN intrinsic dimension on ``N × 128`` points (a 10-dimensional manifold): tdhook's
   chunked exact kNN (``O(N·k)`` memory) against two references written below: tdhook 0.1's
   algorithm (a full ``torch.cdist`` row, self and duplicates masked, a full ``torch.sort`` per
   point; run in row blocks so it fits) and a lean dense one (one N × N ``cdist`` and NumPy's
   in-place SIMD row sort). The dense run is given an
   address-space cap (``--dense-cap-gb``) so that a size it cannot hold fails fast instead of
   pushing a shared machine into the OOM killer.
2. Linear probes on every layer of a 12-layer MLP (width 256): tdhook's
   ``StreamingLinearRegression`` fed batch by batch (no activation kept) against scikit-learn's
   ``LinearRegression`` on the concatenated activations; both report held-out R² per layer.
3. The seed's probing on its PPO agent (``examples/ppo_train_and_probe.py``'s actor and critic,
   26 hooked layers of width 32, observations collected from InvertedDoublePendulum): the seed's
   protocol (``Probing`` + ``ProbeManager(LinearRegression)``, one ``fit`` call on the whole
   training set, float64 activations) against ``ProbeManager(StreamingLinearRegression)`` fed
   ``partial_fit`` batches through the same hooked loss module. Both go through tdhook's API;
   the estimators' own time (fit, partial_fit, predict, preprocessing) is measured inside the
   probes, the end-to-end time includes the loss module's forwards.

Usage::

    .venv/bin/python bench/bench_dimension.py                  # both parts, default sizes
    .venv/bin/python bench/bench_dimension.py --twonn-sizes 10000 50000 --probe-samples 20000
    .venv/bin/python bench/bench_dimension.py --twonn-sizes 100000 --twonn-dim 256 --skip-probes
    .venv/bin/python bench/bench_dimension.py --skip-twonn --ppo-frames 50000   # probes only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
LATENT_DIM = 10
PROBE_DEPTH = 12
PROBE_WIDTH = 256
PROBE_INPUT = 64
PROBE_TARGETS = 4
PROBE_BATCH = 2048


# ----------------------------------------------------------------------------- data


def manifold_points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of a smooth ``LATENT_DIM``-dimensional manifold in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, LATENT_DIM, generator=g)
    w1 = torch.randn(LATENT_DIM, dim, generator=g) / math.sqrt(LATENT_DIM)
    w2 = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    return torch.tanh(z @ w1) @ w2


def probe_model() -> torch.nn.ModuleList:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(PROBE_INPUT, PROBE_WIDTH)]
    layers += [torch.nn.Linear(PROBE_WIDTH, PROBE_WIDTH) for _ in range(PROBE_DEPTH - 1)]
    return torch.nn.ModuleList(layers).eval()


def probe_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, PROBE_INPUT, generator=g)
    fixed = torch.Generator().manual_seed(99)
    lin = torch.randn(PROBE_INPUT, PROBE_TARGETS, generator=fixed) / math.sqrt(PROBE_INPUT)
    freq = torch.randn(PROBE_INPUT, PROBE_TARGETS, generator=fixed) / math.sqrt(PROBE_INPUT)
    y = x @ lin + 0.5 * torch.sin(2.0 * x @ freq) + 0.1 * torch.randn(n, PROBE_TARGETS, generator=g)
    return x, y


@torch.no_grad()
def activations(model: torch.nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The ReLU output of every layer."""
    out = []
    for layer in model:
        x = torch.relu(layer(x))
        out.append(x)
    return out


# ------------------------------------------------------------------------ dense TwoNN


def _two_nn_fit(first_two: torch.Tensor) -> float:
    """TwoNN's line fit through the origin from each point's two neighbour distances ``(N, 2)``."""
    mu = first_two[:, 1].double() / first_two[:, 0].double()
    mu = mu[torch.isfinite(mu)].sort().values
    n = mu.numel()
    xs = torch.log(mu[:-1])
    ys = -torch.log1p(-torch.arange(1, n, dtype=torch.float64) / n)
    return float((xs * ys).sum() / (xs * xs).sum())


def _masked_distances(x: torch.Tensor, start: int, stop: int, eps: float) -> torch.Tensor:
    d = torch.cdist(x[start:stop], x)
    d[torch.arange(stop - start), torch.arange(start, stop)] = math.inf  # self
    return d.masked_fill_(d <= eps, math.inf)  # duplicates


def reference_two_nn(x: torch.Tensor, eps: float = 1e-5, rows: int = 2000) -> float:
    """tdhook 0.1's algorithm: cdist to every point, self and duplicates masked, full ``torch.sort``.

    The arithmetic is the reference's (a full distance row and a full sort per point); it runs
    over blocks of ``rows`` rows so that sizes whose N × N matrix (plus ``torch.sort``'s int64
    indices, 16·N² bytes in all) would not fit in memory can still be timed.
    """
    n = x.shape[0]
    first_two = torch.cat(
        [_masked_distances(x, i, min(n, i + rows), eps).sort(dim=1).values[:, :2] for i in range(0, n, rows)]
    )
    return _two_nn_fit(first_two)


def dense_two_nn(x: torch.Tensor, eps: float = 1e-5) -> float:
    """A lean dense TwoNN: one full N × N cdist, rows sorted in place by NumPy.

    NumPy's float32 sort is vectorised (SIMD) and needs no index array, so this is a strong dense
    baseline: its peak is the distance matrix plus its boolean mask, ``5·N²`` bytes (12.5 GB at
    N = 50k).
    """
    d = _masked_distances(x, 0, x.shape[0], eps)
    rows = d.numpy()
    rows.sort(axis=1)
    first_two = torch.from_numpy(rows[:, :2].copy())
    del d, rows
    return _two_nn_fit(first_two)


# ------------------------------------------------------------------------- children


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_twonn(impl: str, n: int, dim: int, cap_gb: float) -> dict[str, Any]:
    from tensordict import TensorDict

    from tdhook.latent.dimension import TwoNnDimensionEstimator

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    x = manifold_points(n, dim)
    if impl != "tdhook" and cap_gb > 0:
        limit = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base = _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        if impl == "dense":
            value = dense_two_nn(x)
        elif impl == "reference":
            value = reference_two_nn(x)
        else:
            value = float(TwoNnDimensionEstimator()(TensorDict({"data": x}))["dimension"])
    except (RuntimeError, MemoryError) as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "peak_mb": _rss_mb() - base,
        "dimension": value,
    }


def child_probe(impl: str, n_train: int, n_test: int) -> dict[str, Any]:
    from sklearn.linear_model import LinearRegression

    from tdhook.latent.stats import StreamingLinearRegression

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = probe_model()
    x_train, y_train = probe_data(n_train, seed=1)
    x_test, y_test = probe_data(n_test, seed=2)
    test_acts = activations(model, x_test)
    base = _rss_mb()
    fit_seconds = fit_cpu = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    if impl == "tdhook":
        probes = [StreamingLinearRegression() for _ in range(PROBE_DEPTH)]
        for xb, yb in zip(x_train.split(PROBE_BATCH), y_train.split(PROBE_BATCH)):
            acts = activations(model, xb)
            t, c = time.perf_counter(), time.process_time()
            for probe, act in zip(probes, acts):
                probe.partial_fit(act, yb)
            fit_seconds += time.perf_counter() - t
            fit_cpu += time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        r2 = [probe.score(act, y_test) for probe, act in zip(probes, test_acts)]
        fit_seconds += time.perf_counter() - t
        fit_cpu += time.process_time() - c
    else:
        dtype = torch.float64 if impl == "sklearn64" else torch.float32
        chunks: list[list[torch.Tensor]] = [[] for _ in range(PROBE_DEPTH)]
        for xb in x_train.split(PROBE_BATCH):
            for store, act in zip(chunks, activations(model, xb)):
                store.append(act)
        t, c = time.perf_counter(), time.process_time()
        r2 = []
        y_np = y_train.to(dtype).numpy()
        for store, act in zip(chunks, test_acts):
            reg = LinearRegression().fit(torch.cat(store).to(dtype).numpy(), y_np)
            r2.append(float(reg.score(act.to(dtype).numpy(), y_test.to(dtype).numpy())))
        fit_seconds = time.perf_counter() - t
        fit_cpu = time.process_time() - c
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "fit_seconds": fit_seconds,
        "fit_cpu": fit_cpu,
        "peak_mb": _rss_mb() - base,
        "r2": r2,
    }


# ------------------------------------------------------------------- PPO probes

PPO_BATCH = 2048
PPO_SEED = 0


def _ppo_example() -> Any:
    sys.path.insert(0, str(ROOT / "examples"))
    import ppo_train_and_probe as example  # the demo's builders: the seed's env and networks

    return example


def ppo_data(path: Path, frames: int) -> None:
    """Collect ``frames`` transitions with the seed's (random-init) agent; save them and its weights.

    The probes' label is the policy's deterministic action for each observation.
    """
    example = _ppo_example()
    torch.manual_seed(PPO_SEED)
    env = example.make_env(PPO_SEED, torch.device("cpu"))
    agent = example.make_agent(env, torch.device("cpu"))
    batch = example.collect(env, agent, frames, torch.device("cpu"))
    # label: the policy's deterministic action (the sampled one is mostly exploration noise at init)
    with example.set_exploration_type(example.ExplorationType.DETERMINISTIC), torch.no_grad():
        mode = agent.actor(batch.select(example.OBSERVATION_KEY).clone())[example.ACTION_KEY]
    batch[example.LABELS_KEY] = mode
    torch.save({"batch": batch.to_dict(), "state": agent.loss.state_dict()}, path)


class _Clock:
    """Seconds spent inside the probes' estimators and preprocessing."""

    seconds = 0.0
    cpu = 0.0

    @classmethod
    def timed(cls, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - t
                cls.cpu += time.process_time() - c

        return wrapper


def _timed_estimator(base: type) -> type:
    return type(
        base.__name__,
        (base,),
        {
            name: _Clock.timed(getattr(base, name))
            for name in ("fit", "partial_fit", "predict")
            if hasattr(base, name)
        },
    )


def child_ppo_probe(impl: str, path: str) -> dict[str, Any]:
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from tensordict import TensorDict

    from tdhook.latent.probing import ProbeManager, Probing
    from tdhook.latent.stats import StreamingLinearRegression

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    example = _ppo_example()
    saved = torch.load(path, weights_only=False)
    batch = TensorDict(saved["batch"], batch_size=[len(saved["batch"][example.LABELS_KEY])])
    env = example.make_env(PPO_SEED, torch.device("cpu"))
    agent = example.make_agent(env, torch.device("cpu"))
    agent.loss.load_state_dict(saved["state"])
    n_train = int(example.TRAIN_FRACTION * batch.numel())
    train, test = batch[:n_train], batch[n_train:]

    def metrics(preds: Any, labels: Any) -> dict[str, float]:
        return {"r2": float(r2_score(labels, preds))}

    if impl == "sklearn64":  # the seed's protocol, with the demo's float64 preprocessing
        estimator: type = _timed_estimator(LinearRegression)
        preprocess = _Clock.timed(lambda data: data.detach().flatten(1).double())
        train_steps = [(train, "fit")]
    else:
        estimator = _timed_estimator(StreamingLinearRegression)
        preprocess = _Clock.timed(lambda data: data.detach().flatten(1))
        train_steps = [(chunk, "partial_fit") for chunk in train.split(PPO_BATCH)]
    manager = ProbeManager(estimator, {}, metrics, data_preprocess_callback=preprocess)
    base = _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    with (
        torch.no_grad(),
        Probing(
            example.LAYER_PATTERN,
            manager.probe_factory,
            additional_keys=[example.LABELS_KEY, example.STEP_TYPE_KEY],
            relative=False,
        ).prepare(agent.loss) as hooked,
    ):
        for chunk, step in train_steps:
            chunk = chunk.clone(False)
            chunk[example.STEP_TYPE_KEY] = step
            hooked(chunk)
        test = test.clone(False)
        test[example.STEP_TYPE_KEY] = "predict"
        hooked(test)
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "fit_seconds": _Clock.seconds,
        "fit_cpu": _Clock.cpu,
        "peak_mb": _rss_mb() - base,
        "r2": [v["r2"] for v in manager.predict_metrics.values()],
        "layers": len(manager.predict_metrics),
        "n_train": n_train,
    }


def bench_ppo_probes(frames: int, threads: int) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ppo.pt"
        collected = run_child("ppo-data", "collect", str(path), str(frames), threads=threads)
        if "error" in collected:
            return [f"PPO probe benchmark failed (data collection): {collected['error']}"]
        results = {impl: run_child("ppo-probe", impl, str(path), threads=threads) for impl in PPO_IMPLS}
    for name, res in results.items():
        if "error" in res:
            return [f"PPO probe benchmark failed ({name}): {res['error']}"]
    ours = results["tdhook"]
    title = (
        f"### The seed's probing: all {ours['layers']} actor and critic layers of its PPO agent (width 32), "
        f"{ours['n_train']:,} train / {frames - ours['n_train']:,} test transitions, {threads} CPU thread(s)"
    )
    return probe_table(title, PPO_IMPLS, results, "probes (fit + predict)", "loss forwards")


def probe_table(
    title: str, labels: dict[str, str], results: dict[str, dict[str, Any]], fit: str, forwards: str
) -> list[str]:
    """The markdown table of a probe benchmark; ratios and R² differences are against ``tdhook``."""
    ours = results["tdhook"]
    rows = [
        title,
        "",
        f"| implementation | {fit}: wall / CPU (s) | end to end incl. {forwards}: wall / CPU (s) "
        f"| peak RSS above set-up (MB) | speed-up, {fit} (CPU / wall) | max \\|ΔR²\\| vs tdhook |",
        "|---|---|---|---|---|---|",
    ]
    for impl, label in labels.items():
        res = results[impl]
        diff = max(abs(a - b) for a, b in zip(ours["r2"], res["r2"]))
        rows.append(
            f"| {label} | {res['fit_seconds']:.3f} / {res['fit_cpu']:.3f} | {res['seconds']:.2f} / "
            f"{res['cpu_seconds']:.2f} | {res['peak_mb']:.0f} | {res['fit_cpu'] / ours['fit_cpu']:.1f}× / "
            f"{res['fit_seconds'] / ours['fit_seconds']:.1f}× | {diff:.1e} |"
        )
    return rows


PPO_IMPLS = {
    "tdhook": f"`ProbeManager(StreamingLinearRegression)`, `partial_fit` batches of {PPO_BATCH}",
    "sklearn64": "the seed's `ProbeManager(LinearRegression)`, one `fit`, float64 activations",
}


def run_child(*args: str, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)  # torch and the BLAS behind numpy/scipy (scikit-learn) alike
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def bench_twonn(sizes: list[int], dim: int, cap_gb: float, skip_dense_above: int, threads: int) -> list[str]:
    rows = [
        f"### TwoNN on N × {dim} points (10-dimensional manifold), {threads} CPU thread(s)",
        "",
        "Wall / CPU seconds and peak RSS (MB). *Reference*: tdhook 0.1's algorithm (a full distance "
        "row and a full `torch.sort` per point), timed in row blocks so it fits in memory. *Dense*: "
        "one N × N `cdist` with NumPy's in-place SIMD row sort, a lean dense baseline.",
        "",
        "| N | tdhook chunked | peak RSS | reference algorithm | speed-up vs reference (wall / CPU) "
        "| dense cdist | peak RSS | speed-up vs dense (wall / CPU) | estimate (tdhook / reference / dense) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def timing(res: dict[str, Any]) -> str:
        return f"{res['seconds']:.2f} / {res['cpu_seconds']:.2f}" if "seconds" in res else res["error"]

    def speedup(ours: dict[str, Any], other: dict[str, Any]) -> str:
        if "seconds" not in ours or "seconds" not in other:
            return "—"
        return (
            f"{other['seconds'] / ours['seconds']:.1f}× / {other['cpu_seconds'] / ours['cpu_seconds']:.1f}×"
        )

    for n in sizes:
        ours = run_child("twonn", "tdhook", str(n), str(dim), str(cap_gb), threads=threads)
        ref = run_child("twonn", "reference", str(n), str(dim), str(cap_gb), threads=threads)
        need_gb = 5 * n * n / 2**30  # float32 cdist + its boolean mask
        if n > skip_dense_above:
            dense: dict[str, Any] = {"error": f"not run: needs ≈{need_gb:.0f} GB (> cap {cap_gb:g} GB)"}
        else:
            dense = run_child("twonn", "dense", str(n), str(dim), str(cap_gb), threads=threads)
        estimates = " / ".join(_fmt(r.get("dimension"), ".3f") for r in (ours, ref, dense))
        rows.append(
            f"| {n:,} | {timing(ours)} | {_fmt(ours.get('peak_mb'), '.0f')} | {timing(ref)} | "
            f"{speedup(ours, ref)} | {timing(dense)} | {_fmt(dense.get('peak_mb'), '.0f')} | "
            f"{speedup(ours, dense)} | {estimates} |"
        )
        print(rows[-1], flush=True)
    return rows


def bench_probes(n_train: int, n_test: int, threads: int) -> list[str]:
    results = {
        impl: run_child("probe", impl, str(n_train), str(n_test), threads=threads) for impl in PROBE_IMPLS
    }
    for name, res in results.items():
        if "error" in res:
            return [f"probe benchmark failed ({name}): {res['error']}"]
    ours = results["tdhook"]
    title = (
        f"### Linear probes on all {PROBE_DEPTH} layers of an MLP (width {PROBE_WIDTH}), "
        f"{n_train:,} train / {n_test:,} test samples, batches of {PROBE_BATCH}, {threads} CPU thread(s)"
    )
    rows = probe_table(title, PROBE_IMPLS, results, "fit + score", "forwards")
    rows += ["", f"Held-out R² per layer (tdhook): {', '.join(f'{r:.3f}' for r in ours['r2'])}."]
    return rows


PROBE_IMPLS = {
    "tdhook": "tdhook `StreamingLinearRegression`, streamed (float64 statistics)",
    "sklearn64": "sklearn `LinearRegression`, concatenated float64 activations",
    "sklearn32": "sklearn `LinearRegression`, concatenated float32 activations",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--twonn-sizes", type=int, nargs="+", default=[5000, 10000, 20000, 50000])
    parser.add_argument("--twonn-dim", type=int, default=128)
    parser.add_argument("--dense-cap-gb", type=float, default=20.0, help="address-space cap of the dense run")
    parser.add_argument("--probe-samples", type=int, default=20000)
    parser.add_argument("--probe-test", type=int, default=5000)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads per run (1 gives stable CPU times on a loaded machine)",
    )
    parser.add_argument("--ppo-frames", type=int, default=50000, help="transitions for the PPO probe part")
    parser.add_argument("--skip-twonn", action="store_true")
    parser.add_argument("--skip-probes", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        kind, impl, *rest = args.child
        if kind == "twonn":
            out = child_twonn(impl, int(rest[0]), int(rest[1]), float(rest[2]))
        elif kind == "ppo-data":
            ppo_data(Path(rest[0]), int(rest[1]))
            out = {"ok": True}
        elif kind == "ppo-probe":
            out = child_ppo_probe(impl, rest[0])
        else:
            out = child_probe(impl, int(rest[0]), int(rest[1]))
        print(json.dumps(out))
        return
    load = os.getloadavg()[0]
    lines: list[str] = [
        f"torch {torch.__version__}, {args.threads} thread(s) per run, load average {load:.1f}",
        "",
    ]
    if not args.skip_twonn:
        # dense needs ~5·N² bytes (plus the libraries' own address space); sizes beyond the cap are
        # reported, not attempted
        max_dense = int(math.sqrt((args.dense_cap_gb - 4) * 2**30 / 5))
        lines += [
            *bench_twonn(args.twonn_sizes, args.twonn_dim, args.dense_cap_gb, max_dense, args.threads),
            "",
        ]
    if not args.skip_probes:
        lines += bench_probes(args.probe_samples, args.probe_test, args.threads)
        lines += ["", *bench_ppo_probes(args.ppo_frames, args.threads)]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
