"""Target: unit selection, structure-preserving replacement, validation and JSON round trip."""

from __future__ import annotations

import collections

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from tdhook.errors import InvalidInputError, ModulePathError, TargetError, TdhookError
from tdhook.targets import Target, TargetKind

Pair = collections.namedtuple("Pair", ["hidden", "cell"])


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 5)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def test_select_units_on_the_last_axis_equals_indexing(x) -> None:
    t = Target("fc", "activation", -1, (4, 0, -2))
    assert torch.equal(t.select_output(x), x[:, [4, 0, 3]])


def test_select_channels_of_a_conv_activation() -> None:
    torch.manual_seed(0)
    act = torch.randn(2, 6, 4, 4)
    t = Target("conv", feature_axis=1, indices=(2, 5))
    assert torch.equal(t.select_output(act), act[:, [2, 5]])


def test_whole_tensor_without_indices_is_the_tensor_itself(x) -> None:
    assert Target("fc").select_output(x) is x


def test_select_through_output_paths(x) -> None:
    td = TensorDict({"h": {"z": x}}, batch_size=[3])
    assert torch.equal(Target("m", output_path=("h", "z"), indices=(1,)).select_output(td), x[:, [1]])
    value = (x * 2, {"logits": x, "aux": [x + 1, x + 2]})
    assert torch.equal(Target("m", output_path=(1, "aux", 1)).select_output(value), x + 2)
    assert torch.equal(
        Target("m", output_path=(1,), indices=(0,)).select_output(Pair(x, x - 1)), (x - 1)[:, [0]]
    )


def test_a_one_item_tuple_needs_no_path_but_other_structures_do(x) -> None:
    assert torch.equal(Target("m", indices=(2,)).select_output((x,)), x[:, [2]])
    with pytest.raises(TargetError, match=r"reaches a tuple of 2 items.*output_path=\(0,\)"):
        Target("m").select_output((x, x))
    with pytest.raises(TargetError, match=r"reaches a dict.*output_path=\('a',\)"):
        Target("m").select_output({"a": x})
    with pytest.raises(TargetError, match="reaches a TensorDict"):
        Target("m").select_output(TensorDict(a=x, batch_size=[3]))


def test_bad_paths_axes_and_indices_are_refused_when_applied(x) -> None:
    with pytest.raises(TargetError, match=r"slot 2 is out of range for a tuple of 2"):
        Target("m", output_path=(2,)).select_output((x, x))
    with pytest.raises(TargetError, match=r"key 'b' not in the mapping; keys: \['a'\]"):
        Target("m", output_path=("b",)).select_output({"a": x})
    with pytest.raises(TargetError, match="slot 0 needs a tuple or list, got dict"):
        Target("m", output_path=(0,)).select_output({"a": x})
    with pytest.raises(TargetError, match=r"feature_axis 2 is out of range for a tensor of shape \(3, 5\)"):
        Target("m", feature_axis=2, indices=(0,)).select_output(x)
    with pytest.raises(TargetError, match=r"indices \[5\] are out of range for axis -1 of size 5"):
        Target("m", indices=(1, 5)).select_output(x)
    with pytest.raises(TargetError, match="name the same unit twice"):
        Target("m", indices=(4, -1)).select_output(x)
    with pytest.raises(TargetError, match="reaches a str, not a tensor"):
        Target("m", output_path=(0,)).select_output(("text", x))


# ------------------------------------------------------------------------------------------------
# Replacement
# ------------------------------------------------------------------------------------------------


def test_replace_changes_only_the_selected_entries(x) -> None:
    t = Target("m", indices=(1, 3))
    new = t.replace_output(x, torch.tensor([10.0, 30.0]))
    expected = x.clone()
    expected[:, 1] = 10.0
    expected[:, 3] = 30.0
    assert torch.equal(new, expected)
    assert not torch.equal(x, expected)  # the original is untouched


def test_replace_with_a_scalar_and_along_another_axis(x) -> None:
    new = Target("m", feature_axis=0, indices=(2,)).replace_output(x, -1)
    expected = x.clone()
    expected[2] = -1.0
    assert torch.equal(new, expected)
    assert torch.equal(Target("m").replace_output(x, 0.5), torch.full_like(x, 0.5))


@pytest.mark.parametrize(
    ("value", "path", "pick"),
    [
        (lambda x: (x, x + 1), (1,), lambda v: v[1]),
        (lambda x: [x, x + 1], (0,), lambda v: v[0]),
        (lambda x: Pair(x, x + 1), (0,), lambda v: v.hidden),
        (lambda x: {"a": x, "b": (x, x + 2)}, ("b", 1), lambda v: v["b"][1]),
        (
            lambda x: TensorDict({"a": x, "n": {"z": x + 3}}, batch_size=[3]),
            ("n", "z"),
            lambda v: v["n", "z"],
        ),
        (lambda x: torch.max(x.unsqueeze(-1).expand(3, 5, 2), -1), (0,), lambda v: v.values),
    ],
    ids=["tuple", "list", "namedtuple", "dict", "tensordict", "structseq"],
)
def test_replace_keeps_the_container_type_and_the_other_items(x, value, path, pick) -> None:
    original = value(x)
    t = Target("m", output_path=path, indices=(0,))
    new = t.replace_output(original, 7.0)
    assert type(new) is type(original)
    expected = pick(original).clone()
    expected[:, 0] = 7.0
    assert torch.equal(pick(new), expected)
    assert not torch.equal(pick(original), expected)  # the input is not modified
    # the other leaves are carried over as they were
    if isinstance(original, TensorDict):
        assert new["a"] is original["a"]
    elif isinstance(original, dict):
        assert new["a"] is original["a"]
        assert new["b"][0] is original["b"][0]
    else:
        other = 1 - path[0]
        assert original[other] is new[other]


def test_replacement_is_differentiable_in_both_the_kept_and_the_new_entries(x) -> None:
    leaf = x.clone().requires_grad_(True)
    rep = torch.zeros(3, 1, requires_grad=True)
    out = Target("m", indices=(2,)).replace_output(leaf, rep)
    out.sum().backward()
    mask = torch.ones(3, 5)
    mask[:, 2] = 0
    assert torch.equal(leaf.grad, mask)
    assert torch.equal(rep.grad, torch.ones(3, 1))


def test_replacement_shape_and_type_are_checked(x) -> None:
    with pytest.raises(
        TargetError, match=r"replacement of shape \(3,\) does not broadcast to the selected shape \(3, 2\)"
    ):
        Target("m", indices=(0, 1)).replace_output(x, torch.zeros(3))
    with pytest.raises(InvalidInputError, match="must be a tensor or a number, got str"):
        Target("m").replace_output(x, "zero")


def test_map_output_applies_a_function_to_the_selection(x) -> None:
    t = Target("m", output_path=(0,), indices=(1,))
    new = t.map_output((x, x), lambda sel: sel * 2)
    expected = x.clone()
    expected[:, 1] *= 2
    assert torch.equal(new[0], expected)


# ------------------------------------------------------------------------------------------------
# Construction and model validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kind": "weights"}, TargetError, r"Invalid target kind 'weights': expected one of \['activation'"),
        ({"indices": ()}, TargetError, "must be non-empty"),
        ({"indices": (1, 1)}, TargetError, "must be distinct"),
        ({"indices": (1.0,)}, InvalidInputError, "indices must be a tuple of ints"),
        ({"indices": (True,)}, InvalidInputError, "indices must be a tuple of ints"),
        ({"feature_axis": 1.5}, InvalidInputError, "feature_axis must be an int"),
        ({"occurrences": (2, 1)}, TargetError, "strictly increasing"),
        ({"occurrences": (-1,)}, TargetError, "non-negative"),
        (
            {"output_path": (0, 1.5)},
            InvalidInputError,
            "output_path must be a tuple of int slots and str keys",
        ),
        ({"kind": "parameter"}, TargetError, "needs parameter='<name>'"),
        ({"kind": "parameter", "parameter": "weight", "output_path": (0,)}, TargetError, "do not apply"),
        ({"parameter": "weight"}, TargetError, "only meaningful for kind='parameter'"),
    ],
)
def test_fields_are_checked_at_construction(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        Target("fc", **kwargs)


def test_errors_are_tdhook_errors_and_builtins() -> None:
    with pytest.raises(ValueError, match="strictly increasing") as info:
        Target("fc", occurrences=(1, 1))
    assert isinstance(info.value, TdhookError)
    with pytest.raises(TypeError):
        Target("fc", indices="0")
    with pytest.raises(ModulePathError, match="slices are not supported"):
        Target("layers[0:2]")
    with pytest.raises(TypeError, match="module_path must be a str"):
        Target(3)  # type: ignore[arg-type]


def test_lists_are_accepted_and_the_target_is_hashable() -> None:
    a = Target("fc", "gradient", 1, [0, 2], output_path=[0], occurrences=[1])
    b = Target("fc", TargetKind.GRADIENT, 1, (0, 2), output_path=(0,), occurrences=(1,))
    assert a == b
    assert len({a, b}) == 1
    assert a.kind == "gradient"
    assert Target("fc", indices=3).indices == (3,)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_validate_resolves_the_module_and_names_the_nearest_paths() -> None:
    net = Net()
    assert Target("encoder[0]").validate(net) is net.encoder[0]
    assert Target("").validate(net) is net
    with pytest.raises(
        ModulePathError, match=r"Target\(activation, 'encodr\.0'\).*Nearest existing module names: \['encoder"
    ):
        Target("encodr.0").validate(net)


def test_validate_checks_parameters_and_their_ranges() -> None:
    net = Net()
    t = Target("head", "parameter", 0, (1,), parameter="weight")
    assert t.validate(net) is net.head
    assert torch.equal(t.select_output(net.head.weight), net.head.weight[[1]])
    with pytest.raises(
        TargetError, match=r"has no parameter 'wieght'; its parameters are \['weight', 'bias'\]"
    ):
        Target("head", "parameter", parameter="wieght").validate(net)
    with pytest.raises(TargetError, match=r"indices \[2\] are out of range for axis 0 of size 2"):
        Target("head", "parameter", 0, (2,), parameter="weight").validate(net)


# ------------------------------------------------------------------------------------------------
# Serialisation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        Target("fc"),
        Target("blocks[3].attn", "activation", -1, (0, 7), output_path=(0, "hidden", 2), occurrences=(0, 2)),
        Target("layers.0", "gradient", 1, (5,)),
        Target("<a/b>.conv", "parameter", 0, (1, 2), parameter="weight"),
    ],
    ids=str,
)
def test_json_and_dict_round_trip(target: Target) -> None:
    assert Target.from_json(target.to_json()) == target
    assert Target.from_dict(target.to_dict()) == target
    assert hash(Target.from_json(target.to_json())) == hash(target)


def test_from_dict_and_from_json_refuse_bad_input() -> None:
    with pytest.raises(TargetError, match=r"unknown key\(s\) \['layer'\]. Valid keys"):
        Target.from_dict({"module_path": "fc", "layer": 1})
    with pytest.raises(TargetError, match="no 'module_path'"):
        Target.from_dict({"kind": "activation"})
    with pytest.raises(TypeError, match="expects a mapping"):
        Target.from_dict([("module_path", "fc")])  # type: ignore[arg-type]
    with pytest.raises(TargetError, match="expects a JSON object"):
        Target.from_json("{not json")
