"""``inplace_modules``: which submodules modify their input in place (guarded by runs and sessions)."""

from __future__ import annotations

from tensordict.nn import TensorDictModule
from torch import nn

from tdhook._core.forward_state import inplace_modules


class ClassFlag(nn.Module):
    inplace = True

    def forward(self, x):
        return x.mul_(2)


class ComputedFlag(nn.Module):
    @property
    def inplace(self) -> bool:
        return True

    def forward(self, x):
        return x.add_(1)


def test_finds_instance_class_and_computed_flags_only() -> None:
    relu_inplace, relu, dropout = nn.ReLU(inplace=True), nn.ReLU(), nn.Dropout(inplace=True)
    class_flag, computed = ClassFlag(), ComputedFlag()
    model = nn.Sequential(nn.Linear(2, 2), relu_inplace, relu, dropout, class_flag, computed)
    found = inplace_modules(model)
    assert found == [relu_inplace, dropout, class_flag, computed]


def test_a_tensordict_module_writing_into_its_input_is_not_one() -> None:
    td_module = TensorDictModule(nn.Sequential(nn.ReLU(inplace=True)), ["x"], ["y"])
    assert td_module.inplace is True
    assert inplace_modules(td_module) == [td_module.module[0]]
