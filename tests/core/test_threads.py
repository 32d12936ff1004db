"""Thread rules (issue 11 §3, docs/guarantees.md), exercised with real threads.

1. A context's forward hooks act only in the thread that entered it.
2. A context with backward hooks is exclusive: no other thread may have an active context on
   the model (nor start a run) meanwhile.
3. A method instance keeping per-call state is active in one thread at a time; the stateless
   ones (caching, steering, patching) may be shared.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import Saliency
from tdhook.errors import ConcurrencyError
from tdhook.latent import ActivationCaching, ActivationPatching, SteeringVectors
from tdhook.modules import HookedModule

TIMEOUT = 20


@contextlib.contextmanager
def held_in_another_thread(context: Callable[[], Any]) -> Iterator[None]:
    """Enter ``context()`` in a second thread and keep it active for the ``with`` body."""
    entered, release = threading.Event(), threading.Event()

    def holder() -> None:
        with context():
            entered.set()
            release.wait(TIMEOUT)

    thread = threading.Thread(target=holder)
    thread.start()
    assert entered.wait(TIMEOUT)
    try:
        yield
    finally:
        release.set()
        thread.join(TIMEOUT)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _run_threads(*targets: Callable[[], Any]) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as err:
                errors.append(err)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    return errors


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_two_threads_steer_only_their_own_forwards() -> None:
    model = _model()
    x = torch.randn(8, 4)
    vectors = [torch.full((5,), 1.0), torch.full((5,), -3.0)]
    with torch.no_grad():
        expected = [model[2](model[1](model[0](x) + v)) for v in vectors]
        plain = model(x)
    both_active = threading.Barrier(3, timeout=TIMEOUT)
    done = threading.Barrier(3, timeout=TIMEOUT)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def worker(i: int) -> None:
        with SteeringVectors(["0"], vectors={"0": vectors[i]}).prepare(model) as hooked, torch.no_grad():
            both_active.wait()
            for _ in range(30):
                results[i].append(hooked(TensorDict(input=x, batch_size=[8]))["output"])
            done.wait()

    plain_seen: list[torch.Tensor] = []

    def bystander() -> None:  # a plain forward in a third thread sees the unhooked model
        both_active.wait()
        with torch.no_grad():
            for _ in range(30):
                plain_seen.append(model(x))
        done.wait()

    assert not _run_threads(lambda: worker(0), lambda: worker(1), bystander)
    for i in (0, 1):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i])
    for out in plain_seen:
        torch.testing.assert_close(out, plain)
    assert _no_hooks(model)


def test_shared_caching_and_patching_instances_keep_threads_apart() -> None:
    model = _model()
    caching = ActivationCaching("0")
    patching = ActivationPatching(["1"], clean_intermediate_keys=False)
    inputs = [torch.randn(6, 4), torch.randn(6, 4)]
    together = threading.Barrier(2, timeout=TIMEOUT)
    caches: dict[int, list[TensorDict]] = {0: [], 1: []}

    def worker(i: int) -> None:
        x = inputs[i]
        with caching.prepare(model) as hooked, torch.no_grad():
            together.wait()
            for _ in range(20):
                hooked(TensorDict(input=x, batch_size=[6]))
                caches[i].append(hooked.hooking_context.cache["0"].clone())
        td = TensorDict({"input": x, ("patched", "input"): inputs[1 - i]}, batch_size=[6])
        with patching.prepare(model) as hooked, torch.no_grad():
            together.wait()
            for _ in range(20):
                out = hooked(td.clone())
                torch.testing.assert_close(out["_cache", "1"], torch.tanh(model[0](x)))
                torch.testing.assert_close(out["patched", "output"], out["output"])

    assert not _run_threads(lambda: worker(0), lambda: worker(1))
    for i in (0, 1):
        for value in caches[i]:
            torch.testing.assert_close(value, model[0](inputs[i]).detach())


def test_stateful_instance_refuses_a_second_thread() -> None:
    model = _model()
    saliency = Saliency()
    with held_in_another_thread(lambda: saliency.prepare(model)):
        with pytest.raises(
            ConcurrencyError, match=r"Saliency instance is already active.*one Saliency\(...\) per"
        ):
            saliency.prepare(model).__enter__()
        with Saliency().prepare(model) as hooked:  # a second instance is fine
            td = hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2]))
        assert ("attr", "input") in td.keys(include_nested=True)
    with saliency.prepare(model):  # free again once the other thread left
        pass


def test_backward_hook_context_is_exclusive() -> None:
    """Backward hooks run in autograd's threads: such a context cannot share the model."""
    model = _model()
    grads = ActivationCaching("0", directions="bwd", callback=lambda grad_input, **_: grad_input[0])
    with held_in_another_thread(lambda: grads.prepare(model)):
        with pytest.raises(ConcurrencyError, match=r"uses backward hooks.*copy.deepcopy"):
            ActivationCaching("0").prepare(model).__enter__()
        edited = pytest.raises(ConcurrencyError, match="ActivationCaching context of another thread")
        with edited, HookedModule.from_module(model).run(torch.randn(2, 4)) as run:
            run.get("[0]")
    assert _no_hooks(model)
    with ActivationCaching("0").prepare(model):  # the model is free again
        pass


def test_hooked_module_called_from_another_thread_is_refused() -> None:
    model = _model()
    with SteeringVectors(["0"], vectors={"0": torch.ones(5)}).prepare(model) as hooked:
        errors = _run_threads(lambda: hooked(TensorDict(input=torch.randn(2, 4), batch_size=[2])))
    assert len(errors) == 1
    assert isinstance(errors[0], ConcurrencyError)
    assert "enter a context (prepare(model)) in each thread" in str(errors[0])


def test_runs_in_two_threads_keep_their_values() -> None:
    model = _model()
    inputs = [torch.randn(3, 4), torch.randn(3, 4)]
    together = threading.Barrier(2, timeout=TIMEOUT)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def worker(i: int) -> None:
        hooked = HookedModule.from_module(model)
        together.wait()
        for _ in range(50):
            with hooked.run(inputs[i]) as run:
                proxy = run.get("[0]")
                run.set("[2]", None, callback=lambda output, **_: output * 0)
            seen[i].append(proxy.resolve())
            with torch.no_grad():
                out = model(inputs[i])
            assert bool((out != 0).any())  # the other thread's set hook never fires here

    assert not _run_threads(lambda: worker(0), lambda: worker(1))
    for i in (0, 1):
        for value in seen[i]:
            torch.testing.assert_close(value, model[0](inputs[i]).detach())
