"""The module-path grammar and regex selection."""

from __future__ import annotations

import pytest
import torch
from tensordict.nn import TensorDictModule
from torch import nn

from tdhook._core.paths import join_paths, parse_path, resolve_path, select_modules
from tdhook.errors import ModulePathError, NoMatchError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
        self.blocks = nn.ModuleDict({"attn": nn.Identity(), "a/b": nn.ReLU()})
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Tanh(), nn.ReLU()))
        self.linear1 = nn.Linear(2, 2)
        self.linear10 = nn.Linear(2, 2)
        self.scale = 2.0


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("", ()),
        ("linear1", ("linear1",)),
        ("layers[0]", ("layers", 0)),
        ("layers[-1]", ("layers", -1)),
        ("layers.0", ("layers", "0")),
        ("[2]", (2,)),
        ("2", ("2",)),
        ("blocks['attn']", ("blocks", "attn")),
        ('blocks["attn"]', ("blocks", "attn")),
        ("blocks.<a/b>", ("blocks", "a/b")),
        ("seq[1][0]", ("seq", 1, 0)),
        (".seq..1.", ("seq", "1")),
    ],
)
def test_parse(path: str, steps: tuple) -> None:
    assert parse_path(path) == steps


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", lambda n: n),
        ("layers[0]", lambda n: n.layers[0]),
        ("layers[-1]", lambda n: n.layers[2]),
        ("layers.1", lambda n: n.layers[1]),
        ("blocks['attn']", lambda n: n.blocks["attn"]),
        ("blocks.<a/b>", lambda n: n.blocks["a/b"]),
        ("seq[1][-1]", lambda n: n.seq[1][1]),
        ("seq.1.0", lambda n: n.seq[1][0]),
    ],
)
def test_resolve(net: Net, path: str, expected) -> None:
    assert resolve_path(net, path) is expected(net)


def test_bare_integer_on_sequential_root() -> None:
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    assert resolve_path(model, "2") is model[2]
    assert resolve_path(model, "[2]") is model[2]
    assert resolve_path(model, "[-1]") is model[2]


def test_tensordict_module_forwards_to_inner_module() -> None:
    inner = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    td_module = TensorDictModule(inner, ["input"], ["output"])
    assert resolve_path(td_module, "module.0") is inner[0]
    assert resolve_path(td_module, "[1]") is inner[1]


def test_unknown_path_lists_nearest_names(net: Net) -> None:
    with pytest.raises(ModulePathError, match=r"no submodule 'linear2'.*'linear1'") as info:
        resolve_path(net, "linear2")
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModulePathError, match=r"'layers' has no submodule 5"):
        resolve_path(net, "layers[5]")


def test_non_module_attribute_is_refused(net: Net) -> None:
    with pytest.raises(ModulePathError, match="is a float, not an nn.Module"):
        resolve_path(net, "scale")


@pytest.mark.parametrize(("path", "message"), [("layers[1:3]", "slices"), ("a.<b", "missing closing '>'")])
def test_malformed_paths(net: Net, path: str, message: str) -> None:
    with pytest.raises(ModulePathError, match=message):
        resolve_path(net, path)


def test_no_eval(net: Net) -> None:
    with pytest.raises(ModulePathError):
        resolve_path(net, "__class__.__init__(0)")


def test_select_anchors_at_start_like_re_match(net: Net) -> None:
    names = [n for n, _ in select_modules(net, "linear1")]
    assert names == ["linear1", "linear10"]
    assert [n for n, _ in select_modules(net, "linear1$")] == ["linear1"]
    assert [n for n, _ in select_modules(net, r"layers\.\d")] == ["layers.0", "layers.1", "layers.2"]


def test_select_class_filters_and_prefix(net: Net) -> None:
    names = [n for n, _ in select_modules(net, "seq", classes_to_skip=(nn.Sequential,))]
    assert names == ["seq.0", "seq.1.0", "seq.1.1"]
    names = [n for n, _ in select_modules(net, r"abs\.seq\.0", prefix="abs")]
    assert names == ["abs.seq.0"]


def test_select_no_match_raises_with_names(net: Net) -> None:
    with pytest.raises(NoMatchError, match=r"matched no module.*'layers'"):
        select_modules(net, "nothing_here")
    assert select_modules(net, "nothing_here", strict=False) == []


def test_join_paths() -> None:
    assert join_paths("td_module", "", "module") == "td_module.module"
    assert join_paths("td_module", None) == "td_module"


def test_module_list_indexing_matches_its_getitem() -> None:
    """The ModuleList shortcut of resolve_path: same module as ``list[i]``, same refusals."""
    layers = nn.ModuleList([nn.Linear(1, 1) for _ in range(4)])
    del layers[1]  # ModuleList renumbers its keys
    root = nn.Module()
    root.layers = layers
    for i in range(-3, 3):
        assert resolve_path(root, f"layers[{i}]") is layers[i]
    for bad in (3, -4):
        with pytest.raises(IndexError):
            layers[bad]
        with pytest.raises(
            ModulePathError, match=rf"'layers' has no submodule {bad} \(IndexError: index {bad}"
        ):
            resolve_path(root, f"layers[{bad}]")


# -- resolution chains (the hooked module's remembered resolutions) ---------------------------------


def test_resolution_chain_replays_child_names_and_sees_swaps(net: Net) -> None:
    from tdhook._core.paths import chain_holds, resolution_chain

    chain = resolution_chain(net, "seq.1.0")
    assert chain is not None
    assert chain[-1][2] is net.seq[1][0]
    assert chain_holds(chain)
    net.seq[1] = nn.Sequential(nn.GELU(), nn.ReLU())  # an intermediate module swapped
    assert not chain_holds(chain)
    assert resolution_chain(net, "layers[-1]") is None  # indices are resolved every time
    assert resolution_chain(net, "scale") is None  # not a child


def test_resolution_chain_through_a_tensordict_module() -> None:
    from tdhook._core.paths import chain_holds, resolution_chain

    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    td_module = TensorDictModule(inner, ["x"], ["y"])
    chain = resolution_chain(td_module, "1")
    assert chain is not None
    assert chain[-1][2] is inner[1]
    assert chain_holds(chain)
    td_module.module = nn.Sequential(nn.Linear(2, 2), nn.Tanh())  # the wrapped model replaced
    assert not chain_holds(chain)


def test_hooked_module_sees_a_swapped_submodule_between_runs() -> None:
    from tensordict import TensorDict

    from tdhook.modules import HookedModule

    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    hooked = HookedModule.from_module(model)
    td = TensorDict({"input": torch.randn(3, 2)}, batch_size=[3])
    with hooked.run(td) as run:
        proxy = run.save("0")
    first = proxy.resolve()
    new = nn.Linear(2, 2)
    with torch.no_grad():
        new.weight.fill_(0.0)
        new.bias.fill_(7.0)
    model[0] = new
    with hooked.run(td) as run:
        proxy = run.save("0")
    second = proxy.resolve()
    assert not torch.equal(first, second)
    assert torch.equal(second, torch.full((3, 2), 7.0))


def test_hooking_a_module_list_warns_every_time(net: Net) -> None:
    from tensordict import TensorDict

    from tdhook.errors import TdhookWarning
    from tdhook.modules import HookedModule

    hooked = HookedModule.from_module(nn.Sequential(net.layers[0]))
    hooked.root.add_module("lst", net.layers)
    td = TensorDict({"input": torch.randn(1, 2)}, batch_size=[1])
    for _ in range(2):
        with pytest.warns(TdhookWarning, match="ModuleList"), hooked.run(td) as run:
            run.save("lst")
