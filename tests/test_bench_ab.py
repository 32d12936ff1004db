"""bench.ab --paired: the libraries in turn, the order rotating, differences taken within a cycle."""

from __future__ import annotations

from types import SimpleNamespace

from bench import ab


def _fake_task(monkeypatch, calls: list[str], libraries: dict[str, int | None]) -> None:
    """A task (loaded by ``ab.load``) whose libraries log their name in ``calls`` at each run.

    ``libraries``: name -> its ``inner`` (None: no ``inner`` attribute); the baseline is "plain".
    """

    def impl(name: str, inner: int | None) -> type:
        class Impl:
            def setup(self, params: dict) -> None:
                pass

            def run(self) -> None:
                calls.append(name)

        Impl.name = name  # type: ignore[attr-defined]
        if inner is not None:
            Impl.inner = inner  # type: ignore[attr-defined]
        return Impl

    task = SimpleNamespace(impls=[impl(n, i) for n, i in libraries.items()], baseline="plain")
    monkeypatch.setattr(ab, "load", lambda name: task)


def test_paired_rotates_the_order_and_subtracts_the_baseline_within_each_cycle(monkeypatch) -> None:
    calls: list[str] = []
    _fake_task(monkeypatch, calls, {"a": None, "b": None, "plain": None})
    above = ab.paired("fake", {}, cycles=6, inner=1)
    assert set(above) == {"a", "b", "plain"}
    assert above["plain"] == 0
    measured = calls[-18:]  # six cycles of three calls, after set-up and warm-up
    firsts = [measured[i] for i in range(0, 18, 3)]
    assert sorted(firsts) == ["a", "a", "b", "b", "plain", "plain"]  # each library leads equally often
    for i in range(0, 18, 3):
        assert sorted(measured[i : i + 3]) == ["a", "b", "plain"]  # every library once per cycle


def test_paired_turns_are_each_librarys_inner_calls_by_default(monkeypatch) -> None:
    calls: list[str] = []
    _fake_task(monkeypatch, calls, {"a": 3, "plain": 2})
    ab.paired("fake", {}, cycles=2)
    assert (
        calls[-10:] == ["a"] * 3 + ["plain"] * 2 + ["plain"] * 2 + ["a"] * 3
    )  # turns of inner calls, rotated
    calls.clear()
    ab.paired("fake", {}, cycles=2, inner=1)
    assert calls[-4:] == ["a", "plain", "plain", "a"]
