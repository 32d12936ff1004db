"""One signature rule for every user function tdhook calls by keyword (``_core/signatures.py``):
hook callbacks (``check_callback``), ``patch_fn``/``steer_fn`` (``check_keywords``) and the
keywords an adapter declares (``declared_keywords``); and one table of hook-value parameters."""

from __future__ import annotations

import pytest
from torch import nn

from tdhook._core.directions import HookDirection
from tdhook._core.signatures import check_callback, check_keywords, declared_keywords
from tdhook.errors import HookSignatureError


@pytest.mark.parametrize(
    ("direction", "param"),
    [
        ("fwd", "output"),
        ("fwd_kwargs", "output"),
        ("fwd_pre", "args"),
        ("fwd_pre_kwargs", "args"),
        ("bwd", "grad_input"),
        ("bwd_pre", "grad_output"),
    ],
)
def test_value_param_names_the_value_a_hook_replaces(direction: str, param: str) -> None:
    d = HookDirection.parse(direction)
    assert d.value_param == param
    assert param in d.params


def test_check_keywords_accepts_exact_and_var_keyword_functions() -> None:
    check_keywords(lambda module_key, output: output, ("module_key", "output"), "steer_fn")
    check_keywords(lambda output, **_: output, ("module_key", "output"), "steer_fn")
    check_keywords(None, ("output",), "steer_fn")


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda output: output, r"steer_fn does not accept \['module_key'\]"),
        (lambda module_key, output, extra: output, r"requires unknown parameters \['extra'\]"),
        (lambda module_key, output, /: output, "cannot have positional-only parameters"),
        (3, "steer_fn must be callable, got int"),
    ],
)
def test_check_keywords_refuses_with_the_fix(fn, match: str) -> None:
    with pytest.raises(HookSignatureError, match=match) as info:
        check_keywords(fn, ("module_key", "output"), "steer_fn")
    assert isinstance(info.value, ValueError)


def test_check_callback_uses_the_same_rule() -> None:
    check_callback(lambda module, args, output, key=None: output, HookDirection.FWD, ("key", "direction"))
    with pytest.raises(HookSignatureError, match=r"missing required parameters: \['module'\]"):
        check_callback(lambda args, output: output, HookDirection.FWD)
    with pytest.raises(HookSignatureError, match=r"requires unknown parameters \['other'\]"):
        check_callback(lambda module, args, output, other: output, HookDirection.FWD)


def test_declared_keywords_skip_the_value_parameter_and_read_a_module_forward() -> None:
    available = (*HookDirection.FWD.params, "direction")
    assert declared_keywords(lambda output: output, available) == ()
    assert declared_keywords(lambda value, module, direction: value, available) == ("module", "direction")
    assert declared_keywords(lambda value, **kw: value, available) == available

    class Adapter(nn.Module):
        def forward(self, value, args):
            return value

    assert declared_keywords(Adapter(), available) == ("args",)
    assert declared_keywords(len, available) == ()
