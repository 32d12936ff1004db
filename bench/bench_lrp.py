"""LRP EpsilonPlus: tdhook vs zennit (when importable) vs a hand-written closed form (2 threads).

Model: a depth-10 ReLU MLP (widths 256 and 1000, 10 outputs), batches of 100 and 1000. Every
implementation computes the ε-LRP relevance of the input for a seed of ones at the output
(tdhook's default seed, zennit's ``backward(ones)``):

* ``tdhook``: ``LRP(rule_mapper=EpsilonPlus(1e-6))``, one call of the hooked module timed;
* ``zennit``: ``EpsilonPlus(epsilon=1e-6)`` composite, forward + ``autograd.grad(ones)`` timed
  (zennit needs torchvision, so it runs in the benchmark environment);
* ``limit``: the closed form ``R_in = x ⊙ Wᵀ (R / stab(z))`` layer by layer, no hooks at all.

The implementations alternate within each repeat (so machine load hits them alike), each inside
its own context (entered and left untimed: no two methods' hooks are ever on the model at once);
the table gives the median (and min) of ``--repeats`` calls after one warm-up round. Every
result is first checked with ``allclose`` against ``limit``. Usage::

    .venv/bin/python bench/bench_lrp.py                  # all sizes
    .venv/bin/python bench/bench_lrp.py --quick          # width 256, batch 100 only
    .venv/bin/python bench/bench_lrp.py --cpu-time       # CPU time instead of wall time
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution.lrp import LRP, EpsilonPlus, stabilize

EPSILON = 1e-6
DEPTH = 10


def mlp(width: int, depth: int = DEPTH, n_out: int = 10) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers).eval()


def limit(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """ε-LRP in closed form: the forward activations, then ``R ← a ⊙ Wᵀ (R / stab(z))``."""
    with torch.no_grad():
        acts = [x]
        for layer in model:
            acts.append(layer(acts[-1]))
        relevance = torch.ones_like(acts[-1])
        for k in range(len(model) - 1, -1, -1):
            layer = model[k]
            if isinstance(layer, nn.Linear):
                relevance = acts[k] * ((relevance / stabilize(acts[k + 1], EPSILON)) @ layer.weight)
        return relevance


Session = Callable[[], contextlib.AbstractContextManager[Callable[[], torch.Tensor]]]


def interleaved(
    sessions: dict[str, Session], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, tuple[float, float]]:
    """``{name: (median, min)}`` seconds of one call.

    Implementations alternate within each repeat, so machine load hits them alike; each opens
    its own context around its call (untimed), so no two methods' hooks are on the model at once.
    """
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for repeat in range(repeats + 1):
        for name, session in sessions.items():
            with session() as fn:
                start = clock()
                fn()
                elapsed = clock() - start
            if repeat:  # the first round is the warm-up
                times[name].append(elapsed)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


@contextlib.contextmanager
def limit_session(model: nn.Sequential, x: torch.Tensor) -> Iterator[Callable[[], torch.Tensor]]:
    yield functools.partial(limit, model, x)


@contextlib.contextmanager
def tdhook_session(model: nn.Sequential, x: torch.Tensor) -> Iterator[Callable[[], torch.Tensor]]:
    td = TensorDict(input=x, batch_size=x.shape[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = LRP(rule_mapper=EpsilonPlus(EPSILON)).prepare(model)
    with context as hooked:
        yield lambda: hooked(td.clone(False))["attr", "input"]


@contextlib.contextmanager
def zennit_session(model: nn.Sequential, x: torch.Tensor) -> Iterator[Callable[[], torch.Tensor]]:
    from zennit.composites import EpsilonPlus as ZennitEpsilonPlus

    with ZennitEpsilonPlus(epsilon=EPSILON).context(model) as modified:

        def call() -> torch.Tensor:
            inp = x.clone().requires_grad_(True)
            out = modified(inp)
            (rel,) = torch.autograd.grad(out, inp, torch.ones_like(out))
            return rel

        yield call


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="width 256, batch 100 only")
    parser.add_argument(
        "--cpu-time", action="store_true", help="CPU seconds of this process (robust to a loaded machine)"
    )
    args = parser.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    has_zennit = importlib.util.find_spec("zennit") is not None
    sizes = [(256, 100)] if args.quick else [(256, 100), (256, 1000), (1000, 100), (1000, 1000)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, depth {DEPTH}, {args.repeats} repeats"
    )
    print(
        f"load average at start: {os.getloadavg()[0]:.1f} (timings are unreliable when it exceeds the threads)"
    )
    print(f"{'CPU' if args.cpu_time else 'wall'} ms per call, median (min)")
    print(f"{'width':>6} {'batch':>6} {'limit':>16} {'tdhook':>16} {'zennit':>16} {'tdhook/zennit':>14}")
    for width, batch in sizes:
        model = mlp(width)
        torch.manual_seed(1)
        x = torch.randn(batch, width)
        sessions: dict[str, Session] = {
            "limit": functools.partial(limit_session, model, x),
            "tdhook": functools.partial(tdhook_session, model, x),
        }
        if has_zennit:
            sessions["zennit"] = functools.partial(zennit_session, model, x)
        expected = limit(model, x)
        for name, session in sessions.items():  # correctness gate
            with session() as fn:
                torch.testing.assert_close(
                    fn(), expected, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
                )
        result = interleaved(sessions, args.repeats, clock)
        cells = [
            f"{result[k][0] * 1e3:8.2f} ({result[k][1] * 1e3:6.2f})" if k in result else f"{'n/a':>16}"
            for k in ("limit", "tdhook", "zennit")
        ]
        ratio = f"{result['tdhook'][0] / result['zennit'][0]:14.2f}" if "zennit" in result else f"{'n/a':>14}"
        print(f"{width:>6} {batch:>6} {cells[0]} {cells[1]} {cells[2]} {ratio}")


if __name__ == "__main__":
    main()
