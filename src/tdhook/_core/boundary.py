"""The call boundary: wrapping a model for TensorDicts, and the checks on what enters it.

:func:`wrap_module` turns any model into a TensorDict-level module (refusing compiled models);
:func:`_check_dtype` refuses a floating input whose dtype differs from the model's;
:func:`explain_input_error` turns a call that failed on a non-tensor input, or on integers fed to
a floating-point model, into a clear error; the direct tensor call skips ``TensorDictModule``'s
packing when nothing hooks the wrapper, and the direct TensorDict call
(:func:`td_direct_module`, :func:`write_outputs`) skips ``TensorDictModule``'s call machinery
when all it would do is read the in-keys, run the module and write the out-keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from tensordict import NonTensorStack, TensorDict, TensorDictBase, unravel_key_list
from tensordict.nn import TensorDictModule, TensorDictModuleBase, skip_existing
from tensordict.utils import is_non_tensor
from torch import nn
from torch.nn.modules import module as _torch_module

from ..errors import (
    CompiledModelError,
    DtypeMismatchError,
    InvalidInputError,
    InvalidKeyError,
    TdhookError,
)
from . import keys as _keys

if TYPE_CHECKING:
    from .hooked import HookedModule

__all__ = ["check_not_compiled", "wrap_module"]


def wrap_module(
    module: nn.Module,
    in_keys: Sequence[Any] | dict[str, Any] | None = None,
    out_keys: Sequence[Any] | None = None,
) -> tuple[TensorDictModuleBase, str, list[Any], list[Any]]:
    """Return ``(td_module, extra_path, in_keys, out_keys)`` for any model.

    A ``TensorDictModuleBase`` is used as it is; ``in_keys``/``out_keys`` may name a subset of
    its keys, which methods then honour (e.g. attribution only to those inputs). A plain
    ``nn.Module`` is wrapped in a ``TensorDictModule`` reading ``"input"`` and writing
    ``"output"`` by default; dict-like outputs become nested TensorDicts.

    Raises:
        InvalidInputError: If ``module`` is not an ``nn.Module``.
        ValueError: If a key is malformed or not one of the module's keys.
    """
    if not isinstance(module, nn.Module):
        raise InvalidInputError(
            f"prepare() expects an nn.Module or a TensorDictModuleBase, got {type(module).__name__}."
        )
    check_not_compiled(module)
    if isinstance(module, TensorDictModuleBase):
        selected_in = _check_subset(in_keys, module.in_keys, "in_keys")
        selected_out = _check_subset(out_keys, module.out_keys, "out_keys")
        return module, "", selected_in, selected_out
    if isinstance(in_keys, dict):
        td_module = TensorDictModule(module, in_keys=in_keys, out_keys=out_keys or [_keys.DEFAULT_OUT_KEY])
    else:
        td_module = TensorDictModule(
            module,
            in_keys=_keys.normalize_keys(in_keys) or [_keys.DEFAULT_IN_KEY],
            out_keys=_keys.normalize_keys(out_keys) or [_keys.DEFAULT_OUT_KEY],
        )
    return td_module, "module", list(td_module.in_keys), list(td_module.out_keys)


#: Class-level ``forward`` functions seen not to be ``torch.compile``d (checked once each; a class
#: whose forward is replaced gets a new function object, checked again).
_EAGER_FORWARDS: set[Any] = set()


def compiled_reason(module: nn.Module) -> str | None:
    """How ``module`` itself (not its children) runs compiled code that ignores new hooks, or None."""
    cls = type(module)
    if cls.__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        return "is a torch.compile OptimizedModule; pass its `._orig_mod` (same parameters)"
    attrs = module.__dict__
    if attrs.get("_compiled_call_impl") is not None:
        return "was compiled with `module.compile()`; use an uncompiled copy of the model"
    own = attrs.get("forward")
    if own is not None and hasattr(own, "_torchdynamo_orig_callable"):
        return "has a torch.compile'd forward; keep an uncompiled forward for hooking"
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    try:
        if forward in _EAGER_FORWARDS:
            return None
        hashable = True
    except TypeError:  # an unhashable callable: checked every time
        hashable = False
    if hasattr(forward, "_torchdynamo_orig_callable"):
        return "has a torch.compile'd forward; keep an uncompiled forward for hooking"
    if hashable and len(_EAGER_FORWARDS) < 4096:
        _EAGER_FORWARDS.add(forward)
    return None


def _compiled_part(module: nn.Module) -> tuple[str, str] | None:
    """``(name, how)`` of the first ``torch.compile``d part of ``module``, or None."""
    for name, sub in module.named_modules():
        how = compiled_reason(sub)
        if how is not None:
            return name or "<root>", how
    return None


def check_not_compiled(module: nn.Module) -> None:
    """Refuse a ``torch.compile``d model or submodule.

    Compiled code does not run hooks registered after compilation: caching would cache nothing
    and steering would steer nothing, silently.

    Raises:
        CompiledModelError: Naming the compiled module and the fix.
    """
    found = _compiled_part(module)
    if found is not None:
        name, how = found
        raise CompiledModelError(
            f"Module {name!r} {how}. Compiled code ignores hooks added after compilation, so tdhook "
            "cannot hook it (caches would stay empty, interventions would do nothing). Hook the eager "
            "model, e.g. prepare(compiled._orig_mod), and compile afterwards if needed."
        )


def _first_float_param(module: nn.Module) -> torch.Tensor | None:
    for param in module.parameters():
        if param.is_floating_point():
            return param
    return None


def _check_dtype(hooked: HookedModule, key: Any, value: Any) -> None:
    """Refuse a floating input whose dtype differs from the model's first floating parameter.

    ``key`` is the input's TensorDict key, or its position (an int) for a positional tensor.
    """
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return
    ref = hooked.__dict__.get("_ref_param", False)
    if ref is False:
        ref = hooked.__dict__["_ref_param"] = _first_float_param(hooked.td_module)
    if ref is None or ref.dtype == value.dtype:
        return
    if torch.is_autocast_enabled(value.device.type):  # autocast casts inputs itself
        return
    name = f"positional argument {key}" if isinstance(key, int) else repr(key)
    raise DtypeMismatchError(
        f"Input {name} has dtype {value.dtype} but the model's parameters are {ref.dtype}. Cast the input "
        f"(e.g. `x.to({ref.dtype})`) or the model (e.g. `model.to({value.dtype})`) so that they match."
    )


#: How torch reports an integer tensor reaching a floating-point operation.
_INT_INTO_FLOAT = re.compile(r"(?i)dtype|scalar type|not implemented for '(long|int|short|char|byte|bool)'")


def explain_input_error(
    hooked: HookedModule, inputs: Iterable[tuple[Any, Any]], error: Exception
) -> TdhookError | None:
    """A clear error for a call that failed on a bad input, or None when no input explains ``error``.

    ``inputs`` are ``(key, value)`` pairs the model reads (a TensorDict key, or a position for a
    positional argument). A value that is not a tensor (a string stored in the TensorDict) gives
    an :class:`InvalidInputError`; an integer tensor into a floating-point model, when torch
    complained about dtypes, gives a :class:`DtypeMismatchError`. Either message names the key,
    the value, what was expected, the fix, and torch's own message.
    """
    said = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:200]
    ref: Any = None
    for key, value in inputs:
        name = f"positional argument {key}" if isinstance(key, int) else repr(key)
        if value is None:
            continue
        if is_non_tensor(value) or not isinstance(value, (torch.Tensor, TensorDictBase)):
            shown = value.tolist() if isinstance(value, NonTensorStack) else getattr(value, "data", value)
            return InvalidInputError(
                f"Input {name} holds a {type(shown).__name__} ({shown!r:.60}), not a tensor, and the call failed "
                f"on it: {said}. Store the input as a tensor, e.g. td[{key!r}] = torch.as_tensor(x)."
            )
        if isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()):
            if ref is None:
                found = _first_float_param(hooked.td_module)
                ref = False if found is None else found
            if ref is not False and _INT_INTO_FLOAT.search(str(error)):
                return DtypeMismatchError(
                    f"Input {name} has dtype {value.dtype} (integers) but the model's parameters are {ref.dtype}, "
                    f"and the model failed on it: {said}. Cast the input (e.g. `x.to({ref.dtype})`), "
                    "or feed integer ids through an embedding layer."
                )
    return None


def raise_explained(hooked: HookedModule, inputs: Iterable[tuple[Any, Any]], error: Exception) -> NoReturn:
    """Re-raise ``error`` of a failed call: as :func:`explain_input_error`'s clearer error when an input
    explains it, else unchanged (a package error always unchanged)."""
    clearer = None if isinstance(error, TdhookError) else explain_input_error(hooked, inputs, error)
    if clearer is None:
        raise error
    raise clearer from error


def _check_subset(keys: Any, available: Sequence[Any], name: str) -> list[Any]:
    if keys is None:
        return list(available)
    if isinstance(keys, (str, tuple)):
        keys = [keys]
    out = []
    for key in keys:
        if not _keys.is_unraveled(key):
            raise InvalidKeyError(
                f"{name} must be unraveled (a str or a tuple of str), got {type(key).__name__} {key!r}."
            )
        key = key if isinstance(key, str) or len(key) > 1 else key[0]
        if key not in available:
            raise InvalidKeyError(
                f"Key {key!r} not in module.{name}: {list(available)}. Pass a subset of the module's {name}."
            )
        out.append(key)
    return out


def _direct_module(td_module: TensorDictModuleBase) -> tuple[TensorDictModule, nn.Module] | None:
    """The inner module, when calling it on one tensor is what ``td_module(tensor)`` does.

    That is a plain ``TensorDictModule`` with one positional in-key and one out-key (what
    :func:`wrap_module` builds around a plain model). Its tensor call packs the tensor into a
    TensorDict, runs the module and unpacks the output (~17 µs on a CPU); :func:`_direct_call`
    does the same with the module's output alone.
    """
    if type(td_module) is not TensorDictModule or td_module._kwargs is not None:
        return None
    if len(td_module.in_keys) != 1 or len(td_module.out_keys) != 1 or td_module.out_keys[0] == "_":
        return None
    return td_module, td_module.module


def _unhooked(module: nn.Module) -> bool:
    """No hook on ``module`` itself nor global module hooks: skipping its ``__call__`` changes nothing."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def _direct_call(module: nn.Module, x: Any, out_key: Any) -> Any:
    """``module(x)`` with ``TensorDictModule``'s one-out-key tensor-call conventions on the output."""
    out = module(x)
    if isinstance(out, torch.Tensor):
        return out
    if out is None:
        out = ()
    if isinstance(out, (dict, TensorDictBase)) and out_key in out:
        out = out[out_key]
    if isinstance(out, tuple):
        if len(out) > 1:
            # the same errors as TensorDictModule's own tensor call, which this shortcut replaces
            raise RuntimeError(
                f"There are more tensors (len(tensors)={len(out)}) than out_keys (out_keys=[{out_key!r}])."
            )
        if not out:
            raise RuntimeError("There are more out_keys than tensors.")
        out = out[0]
    return TensorDict.from_any(out)


def td_direct_module(td_module: TensorDictModuleBase) -> nn.Module | None:
    """The inner module, when ``td_module(td)`` only reads the in-keys, runs it and writes the out-keys.

    That is a plain ``TensorDictModule`` (not a subclass: probabilistic modules sample, for
    instance) with positional in-keys, no ``method``/``method_kwargs``/``get_kwargs``, writing in
    place into the input, with no hook on the ``TensorDictModule`` itself (``select_out_keys``
    installs one) and ``skip_existing`` off. Its call then costs ~30 µs of dispatching, key
    unravelling and mode switching on a CPU; :meth:`HookedModule._call_model` calls the inner
    module on the values it already read and :func:`write_outputs` writes what the
    ``TensorDictModule`` would. Checked at every call (attributes can be changed between calls);
    anything else takes the ``TensorDictModule``'s own call.
    """
    if (
        type(td_module) is not TensorDictModule
        or td_module._kwargs is not None
        or td_module.method is not None
        or td_module.method_kwargs
        or td_module._get_kwargs
        or td_module.inplace is not True
        or not _unhooked(td_module)
        or skip_existing()
    ):
        return None
    if td_module.out_keys_source != td_module.out_keys:
        return None
    return td_module.module


def write_outputs(td: TensorDictBase, out_keys: Sequence[Any], out: Any) -> TensorDictBase:
    """Write a module's output into ``td`` under ``out_keys`` as ``TensorDictModule`` does.

    ``None`` is no output; a mapping (or TensorDict) holding every out-key gives those entries in
    out-key order; a tuple gives one value per out-key; anything else is one value. ``"_"``
    out-keys are skipped; non-tensor values go through ``TensorDict.from_any``.

    Raises:
        RuntimeError: With ``TensorDictModule``'s messages, if the counts of values and out-keys differ.
    """
    if isinstance(out, torch.Tensor) and len(out_keys) == 1 and out_keys[0] != "_":
        td.set(out_keys[0], out)  # the common case
        return td
    if out is None:
        out = ()
    if isinstance(out, (dict, TensorDictBase)) and all(key in out for key in out_keys):
        if isinstance(out, dict):
            out = dict(zip(unravel_key_list(list(out.keys())), out.values()))
        out = tuple(out.get(key) for key in out_keys)
    if not isinstance(out, tuple):
        out = (out,)
    if len(out) > len(out_keys):
        raise RuntimeError(
            f"There are more tensors (len(tensors)={len(out)}) than out_keys (out_keys={out_keys})."
        )
    if len(out_keys) > len(out):
        raise RuntimeError("There are more out_keys than tensors.")
    for key, value in zip(out_keys, out):
        if key != "_":
            td.set(key, value if isinstance(value, torch.Tensor) else TensorDict.from_any(value))
    return td
