"""HookSession follows the core's thread and ``torch.compile`` rules (docs/guarantees.md), with real threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from core.test_threads import held_in_another_thread  # tests/ is on sys.path (rootdir import)
from torch import nn

from tdhook.errors import CompiledModelError, ConcurrencyError
from tdhook.latent import ActivationCaching
from tdhook.session import HookSession
from tdhook.targets import Target

TIMEOUT = 20


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def _in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in another thread; return its result or re-raise its exception here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_hooks_act_only_in_the_entering_thread() -> None:
    model = _model()
    x, y = torch.randn(2, 4), torch.randn(3, 4)
    plain_y = model(y)
    with HookSession(model) as s:
        hidden = s.capture("1")
        s.replace(Target("2", indices=(0,)), 0.0)
        out_x = model(x)
        out_y = _in_thread(lambda: model(y))  # another thread's call: neither seen nor changed
    assert len(hidden.values) == 1
    assert hidden.values[0].shape == (2, 5)
    assert (out_x[:, 0] == 0).all()
    assert torch.equal(out_y, plain_y)
    assert _no_hooks(model)


def test_two_threads_each_with_a_session_keep_their_values() -> None:
    model = _model()
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    inputs = [torch.randn(2, 4), torch.randn(3, 4)]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with HookSession(model) as s:
                captured = s.capture("0")
                barrier.wait()  # both sessions open at once
                for _ in range(5):
                    model(inputs[i])
                barrier.wait()
            results[i] = captured
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors
    for i in range(2):
        assert len(results[i].values) == 5
        assert results[i].passes == [0, 1, 2, 3, 4]
        expected = model[0](inputs[i])
        assert all(torch.equal(v, expected) for v in results[i].values)
    assert _no_hooks(model)


def test_the_sessions_methods_refuse_another_thread() -> None:
    model = _model()
    with HookSession(model) as s:
        s.capture("0")
        for name, call in [
            ("capture", lambda: s.capture("2")),
            ("replace", lambda: s.replace("2", 0.0)),
            ("stop", lambda: s.stop("2")),
            ("run", lambda: s.run(torch.randn(1, 4))),
        ]:
            with pytest.raises(
                ConcurrencyError, match=rf"HookSession.{name}\(\) called from thread .* entered in"
            ):
                _in_thread(call)
        with pytest.raises(ConcurrencyError, match="Open a session in each thread"):
            _in_thread(lambda: s.__exit__(None, None, None))
        assert s.is_active  # the refused exit changed nothing
        assert [e.operation for e in s.program] == ["pass_start", "capture"]
    assert _no_hooks(model)


def test_a_session_and_backward_hook_contexts_of_other_threads_exclude_each_other() -> None:
    model = _model()
    grads = ActivationCaching("0", directions="bwd", callback=lambda grad_input, **_: grad_input[0])
    with (
        held_in_another_thread(lambda: grads.prepare(model)),
        pytest.raises(
            ConcurrencyError, match=r"ActivationCaching context from another thread.*copy.deepcopy"
        ),
    ):
        HookSession(model).__enter__()
    with HookSession(
        model
    ) as s:  # a session open in this thread and holding a hook: backward hooks elsewhere are refused
        grads = ActivationCaching("0", directions="bwd", callback=lambda grad_input, **_: grad_input[0])
        with grads.prepare(model):  # nothing installed yet: the session holds nothing
            pass
        s.capture("0")
        with pytest.raises(ConcurrencyError, match="active HookSession context from another thread"):
            _in_thread(lambda: grads.prepare(model).__enter__())
    with HookSession(model) as s:  # a parameter edit claims the model too
        s.replace(Target("0", "parameter", parameter="bias"), 0.0)
        with pytest.raises(ConcurrencyError, match="active HookSession context from another thread"):
            _in_thread(lambda: grads.prepare(model).__enter__())
    with grads.prepare(model):  # free again after the session
        pass
    assert _no_hooks(model)


def test_a_session_claims_the_model_with_its_first_hook() -> None:
    from tdhook._core import claims

    model = _model()
    grads = ActivationCaching("0", directions="bwd", callback=lambda grad_input, **_: grad_input[0])
    with HookSession(model) as s:
        assert not claims._ACTIVE  # nothing installed: nothing held
        with held_in_another_thread(lambda: grads.prepare(model)):  # started after the session opened
            with pytest.raises(ConcurrencyError, match=r"ActivationCaching context from another thread"):
                s.capture("0")
            assert len(s.program) == 0  # refused before anything was installed
        assert _no_hooks(model)  # the other context ended; the session left nothing
        captured = s.capture("0")  # the claim succeeds now
        assert [entry[0] for entry in claims._ACTIVE[id(model)]] == [s]
        model(torch.randn(2, 4))
    assert len(captured.values) == 1
    assert captured.passes == [0]
    assert not claims._ACTIVE
    assert _no_hooks(model)


def test_a_collected_model_releases_its_claim() -> None:
    import gc

    from tdhook._core import claims

    model = _model()
    s = HookSession(model)
    with s:
        del model
        gc.collect()
    assert not any(entry[0] is s for entries in claims._ACTIVE.values() for entry in entries)


def test_compiled_models_and_modules_are_refused() -> None:
    model = _model()
    compiled = torch.compile(model)  # held: the session keeps only a weak reference
    with pytest.raises(CompiledModelError, match=r"'<root>' is a torch.compile OptimizedModule.*_orig_mod"):
        HookSession(compiled).__enter__()
    nested = nn.Sequential(_model(), nn.Linear(3, 2))
    nested[0].compile()  # compiled in place: hooks added inside it would not run
    with HookSession(nested) as s:
        before = s.program
        with pytest.raises(CompiledModelError, match=r"'0\.2' up to step 1.*module.compile\(\)"):
            s.capture("0.2")
        with pytest.raises(CompiledModelError, match=r"Module '0' was compiled"):
            s.stop("0")
        assert s.program == before  # refused before anything was installed
        s.capture("1")  # an eager part of the model can still be hooked
    assert _no_hooks(nested)
