"""Every refusal of the core is a package error that is also the built-in tdhook 0.1 raised."""

from __future__ import annotations

import pytest
from tensordict.nn import TensorDictModule
from torch import nn

from tdhook.contexts import CompositeHookingContextFactory
from tdhook.core import HandleGroup
from tdhook.errors import CompositionError, InvalidInputError, InvalidKeyError
from tdhook.latent import ActivationCaching


def test_composition_errors() -> None:
    with pytest.raises(CompositionError, match="at least one factory") as info:
        CompositeHookingContextFactory()
    assert isinstance(info.value, ValueError)


def test_key_errors_name_the_key_and_the_module_keys() -> None:
    td_module = TensorDictModule(nn.Linear(2, 2), in_keys=["a"], out_keys=["out"])
    with pytest.raises(InvalidKeyError, match=r"Key 'b' not in module.in_keys: \['a'\]") as info:
        ActivationCaching("module").prepare(td_module, in_keys=["b"])
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidKeyError, match="must be unraveled"):
        ActivationCaching("module").prepare(td_module, in_keys=[1])


def test_handle_group_refuses_other_values() -> None:
    with pytest.raises(
        InvalidInputError, match="Can only add a HandleGroup to a HandleGroup, got int"
    ) as info:
        HandleGroup() + 1  # type: ignore[operator]
    assert isinstance(info.value, TypeError)
