"""Extensions: what methods attach to the hooked module instead of subclassing it."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from tdhook.core import Extension, HookedModule, HookingContextFactory
from tdhook.errors import ContextStateError, ExtensionConflictError


class Counter(Extension):
    exposes = ("count", "bump")

    def __init__(self, hooked: HookedModule) -> None:
        super().__init__(hooked)
        self.count = 0

    def bump(self) -> int:
        self.count += 1
        return self.count


class OtherCounter(Extension):
    exposes = ("count",)


class Shadowing(Extension):
    exposes = ("get",)  # a HookedModule method


class UsesCounter(HookingContextFactory):
    def _plan(self, hooked):
        hooked.use_extension(Counter).bump()
        return ()


def test_one_extension_per_kind_per_context_reachable_by_type_and_name() -> None:
    model = torch.nn.Linear(2, 2)
    method = UsesCounter()
    with method.prepare(model) as hooked:
        counter = hooked.extension(Counter)
        assert hooked.use_extension(Counter) is counter  # shared, not rebuilt
        assert hooked.count == 1  # exposed name
        assert hooked.bump() == 2
        assert hooked.extensions == (counter,)
        hooked(TensorDict(input=torch.ones(1, 2), batch_size=[1]))
    with method.prepare(model) as again:  # a new hooked module, a new extension
        assert again.extension(Counter) is not counter
        assert again.count == 1


def test_two_methods_of_one_kind_share_the_extension() -> None:
    from tdhook.contexts import CompositeHookingContextFactory

    with CompositeHookingContextFactory(UsesCounter(), UsesCounter()).prepare(
        torch.nn.Linear(2, 2)
    ) as hooked:
        assert hooked.count == 2


def test_conflicting_names_and_missing_extensions_are_refused_clearly() -> None:
    hooked = HookedModule.from_module(torch.nn.Linear(2, 2))
    hooked.use_extension(Counter)
    with pytest.raises(
        ExtensionConflictError, match="'count' it exposes is already provided by the Counter"
    ) as info:
        hooked.use_extension(OtherCounter)
    assert isinstance(info.value, ValueError)
    assert OtherCounter not in {type(e) for e in hooked.extensions}  # nothing attached
    with pytest.raises(ExtensionConflictError, match="'get' .* HookedModule itself"):
        hooked.use_extension(Shadowing)
    with pytest.raises(ContextStateError, match=r"no OtherCounter extension \(attached: \['Counter'\]\)"):
        hooked.extension(OtherCounter)
    with pytest.raises(AttributeError):
        hooked.not_an_attribute
