"""The shared settings of every gradient method, and the one adapter for tdhook 0.1's argument order.

Part of :mod:`tdhook.attribution`. What every gradient method shares (which inputs and modules
are attributed, the targets, the callbacks, the keys) is one frozen :class:`GradientOptions`
value, validated once when it is built. Each method's constructor takes these settings as
keyword arguments (``Saliency(targets=[1], input_modules=["fc1"])``; the names are typed by
:class:`GradientSettings`, so IDEs and type checkers see them) or as a ready ``options=`` value,
plus its own keyword-only parameters.

tdhook 0.1 also accepted the shared settings positionally, in the order of
:data:`SHARED_POSITIONAL` (spec §7.1). :func:`accepts_positional` is the one place that maps such
calls to keywords; it also gives each constructor its full runtime signature
(``inspect.signature(Saliency)`` lists every setting).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypedDict, TypeVar, cast

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey

from ..core import HookDirection, check_callback
from ..errors import InvalidInputError, nearest
from ._errors import KEYS, AttributionError, TargetError

__all__ = [
    "SHARED_POSITIONAL",
    "AttrCallback",
    "GradientOptions",
    "GradientSettings",
    "TargetsArg",
    "accepts_positional",
    "module_names",
    "noise_stdevs",
    "parse_targets",
    "positive_int",
]

#: ``f(td, additional) -> TensorDict``: the signature of every ``init_attr_*`` callback.
AttrCallback = Callable[[TensorDictBase, TensorDictBase], TensorDictBase]

#: ``targets=``: an output index, a list of indices (summed, or one map each with
#: ``separate_targets``), or an integer tensor with one index per sample (captum's ``target=``).
TargetsArg = int | Sequence[int] | torch.Tensor | None

#: tdhook 0.1's positional order of the shared arguments (spec §7.1).
SHARED_POSITIONAL = (
    "use_inputs",
    "use_outputs",
    "input_modules",
    "target_modules",
    "init_attr_targets",
    "init_attr_inputs",
    "init_attr_cache_in",
    "init_attr_grads",
    "additional_init_keys",
    "output_grad_callbacks",
    "attribution_key",
    "clean_intermediate_keys",
    "cache_callback",
)


class GradientSettings(TypedDict, total=False):
    """The shared settings as keyword arguments (the fields of :class:`GradientOptions`)."""

    use_inputs: bool
    use_outputs: bool
    input_modules: Sequence[str] | str | None
    target_modules: Sequence[str] | str | None
    init_attr_targets: AttrCallback | None
    init_attr_inputs: AttrCallback | None
    init_attr_cache_in: AttrCallback | None
    init_attr_grads: AttrCallback | None
    additional_init_keys: Sequence[NestedKey] | None
    output_grad_callbacks: Mapping[str, Callable[..., Any]] | None
    attribution_key: str
    clean_intermediate_keys: bool
    cache_callback: Callable[..., Any] | None
    targets: TargetsArg
    separate_targets: bool
    check_finite: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientOptions:
    """What every gradient method shares; validated and normalised when built.

    Args:
        use_inputs: Attribute to the model inputs (``hooked.in_keys``: a subset if ``prepare``
            got ``in_keys``).
        use_outputs: Use the model outputs (``hooked.out_keys``) as targets.
        input_modules: Module paths (relative to the model) whose outputs are also attributed
            to, under ``(attribution_key, path)``. One string is one path. Use it with
            ``use_inputs=False`` for integer inputs (attribute to the embedding output).
        target_modules: Module paths whose outputs are targets too (keyed by path).
        init_attr_targets: ``f(targets, additional) -> TensorDict`` choosing the targets from the
            outputs (batch ``B``, or ``(*B, n_points)`` for sampling methods; ``additional`` has
            the same batch).
        init_attr_inputs: ``f(inputs, additional) -> TensorDict`` returning the inputs to
            attribute to (a subset, possibly transformed); replaces ``use_inputs``' choice.
        init_attr_cache_in: ``f(activations, additional) -> TensorDict`` selecting the captured
            ``input_modules`` activations to attribute to.
        init_attr_grads: ``f(targets, additional) -> TensorDict`` giving the seeds of the
            backward pass (default: ones, i.e. the gradient of the sum of the targets). With
            ``separate_targets`` each seed has a leading ``K`` dimension.
        additional_init_keys: TensorDict keys passed to the callbacks as ``additional``.
        output_grad_callbacks: ``{module_path: cb}``; ``cb(module=, grad_output=, value=None,
            direction=)`` returns a replacement ``grad_output`` tuple (e.g. masking).
        attribution_key: Root key of the results.
        clean_intermediate_keys: ``False`` also writes the model outputs at
            ``("_mod_out", out_key)`` as tdhook 0.1 did (batch ``B``; ``(*B, n_points)`` for
            sampling methods such as IG). Other intermediates are never written.
        cache_callback: ``f(module=, args=, output=, key=, direction=)`` selecting the tensor of
            an ``input_modules`` output to attribute to (e.g. ``output[0]``).
        targets: Output indices (last dimension of every target) to attribute. ``None``: the
            whole targets. An ``int`` or a list of ints selects the same indices for every sample
            (summed); an integer tensor with one entry per sample (shape ``B``) selects one index
            per sample, like captum's ``target=`` tensor. Strings, floats and bools are refused.
        separate_targets: With ``targets``, compute one map per index in one forward pass and one
            batched backward pass; results have shape ``(*B, K, *feature)``.
        check_finite: Refuse model inputs (and baselines) holding NaN or Inf, whose attributions
            would be NaN. ``False`` skips the check.

    Raises:
        AttributionError: For an invalid setting (a ``ValueError``).
        TargetError: For invalid ``targets`` (a ``ValueError``).

    Examples:
        >>> from tdhook.attribution import GradientOptions, IntegratedGradients, Saliency
        >>> shared = GradientOptions(targets=[1], input_modules="0")
        >>> shared.input_modules
        ('0',)
        >>> methods = [Saliency(options=shared), IntegratedGradients(options=shared, n_steps=8)]
    """

    use_inputs: bool = True
    use_outputs: bool = True
    input_modules: Sequence[str] | None = ()
    target_modules: Sequence[str] | None = ()
    init_attr_targets: AttrCallback | None = None
    init_attr_inputs: AttrCallback | None = None
    init_attr_cache_in: AttrCallback | None = None
    init_attr_grads: AttrCallback | None = None
    additional_init_keys: Sequence[NestedKey] | None = ()
    output_grad_callbacks: Mapping[str, Callable[..., Any]] | None = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    attribution_key: str = KEYS.attr
    clean_intermediate_keys: bool = True
    cache_callback: Callable[..., Any] | None = None
    targets: TargetsArg = None
    separate_targets: bool = False
    check_finite: bool = True

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        put("use_inputs", bool(self.use_inputs))
        put("use_outputs", bool(self.use_outputs))
        put("input_modules", tuple(module_names(self.input_modules, "input_modules")))
        put("target_modules", tuple(module_names(self.target_modules, "target_modules")))
        for name in ("init_attr_targets", "init_attr_inputs", "init_attr_cache_in", "init_attr_grads"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise AttributionError(
                    f"{name} must be callable as f(td, additional) -> TensorDict, got {type(fn).__name__} "
                    f"{fn!r}. Pass a function, e.g. {name}=lambda td, additional: td."
                )
        put("additional_init_keys", tuple(self.additional_init_keys or ()))
        callbacks = self.output_grad_callbacks or {}
        if not isinstance(callbacks, Mapping):
            raise AttributionError(
                f"output_grad_callbacks must map module paths to callbacks, got {type(callbacks).__name__}. "
                "Write output_grad_callbacks={'fc1': cb}."
            )
        for cb in callbacks.values():
            check_callback(cb, HookDirection.BWD_PRE, ("value", "direction"))
        put("output_grad_callbacks", MappingProxyType(dict(callbacks)))
        if not isinstance(self.attribution_key, str):
            raise AttributionError(
                f"attribution_key must be a string (the root key of the results), got "
                f"{type(self.attribution_key).__name__} {self.attribution_key!r}. Use e.g. 'attr'."
            )
        put("clean_intermediate_keys", bool(self.clean_intermediate_keys))
        targets = parse_targets(self.targets, self.separate_targets)
        if (
            self.separate_targets
            and (targets is None or isinstance(targets, int))
            and self.init_attr_grads is None
        ):
            raise AttributionError(
                f"separate_targets=True needs several targets (targets=[i, j, ...]) or an init_attr_grads "
                f"returning seeds with a leading K dimension; got targets={targets!r}."
            )
        put("targets", targets)
        put("separate_targets", bool(self.separate_targets))
        put("check_finite", bool(self.check_finite))

    @classmethod
    def build(
        cls, options: GradientOptions | None, settings: Mapping[str, Any], owner: str
    ) -> GradientOptions:
        """``options`` (or the defaults) updated with keyword ``settings``.

        Raises:
            InvalidInputError: For an unknown setting name (a ``TypeError``) or an ``options``
                that is not a :class:`GradientOptions`.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [name for name in settings if name not in known]
        if unknown:
            close = nearest(unknown[0], known)
            raise InvalidInputError(
                f"{owner}() got an unexpected keyword argument {unknown[0]!r}. "
                + (f"Did you mean {close[0]!r}? " if close else "")
                + f"The shared settings are: {', '.join(sorted(known))}."
            )
        if options is None:
            return cls(**settings)
        if not isinstance(options, cls):
            raise InvalidInputError(
                f"{owner}(options=...) must be a GradientOptions, got {type(options).__name__}. "
                "Build one with GradientOptions(targets=..., ...), or pass the settings as keywords."
            )
        return dataclasses.replace(options, **settings) if settings else options


_F = TypeVar("_F", bound=Callable[..., None])


def accepts_positional(*names: str) -> Callable[[_F], _F]:
    """Let a constructor with keyword-only parameters also take tdhook 0.1's positional order.

    Positional arguments are given the ``names``, in order; the constructor itself is written
    with keyword-only parameters (and ``**settings`` for the :class:`GradientOptions` fields).
    The wrapped constructor's runtime signature lists every parameter: ``names`` first
    (positional or keyword), then the constructor's own keyword-only parameters, then the
    remaining shared settings.

    Raises:
        InvalidInputError: At call time, for too many positional arguments or a value given both
            by position and by name (a ``TypeError``).
    """

    def decorate(init: _F) -> _F:
        @functools.wraps(init)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
            if args:
                owner = type(self).__name__
                if len(args) > len(names):
                    raise InvalidInputError(
                        f"{owner}() takes at most {len(names)} positional arguments (tdhook 0.1's order: "
                        f"{', '.join(names)}), got {len(args)}. Pass the others by keyword."
                    )
                for name, value in zip(names, args):
                    if name in kwargs:
                        raise InvalidInputError(
                            f"{owner}() got multiple values for {name!r} (by position and by keyword). "
                            "Pass it once."
                        )
                    kwargs[name] = value
            init(self, **kwargs)

        wrapper.__signature__ = _full_signature(init, names)  # type: ignore[attr-defined]
        return cast(_F, wrapper)

    return decorate


def _full_signature(init: Callable[..., Any], names: Sequence[str]) -> inspect.Signature:
    own = inspect.signature(init)
    params = list(own.parameters.values())
    self_param, rest = params[0], params[1:]
    takes_settings = any(p.kind is p.VAR_KEYWORD for p in rest)
    defaults = {f.name: f.default for f in dataclasses.fields(GradientOptions)}
    defaults["input_modules"] = defaults["target_modules"] = None
    defaults["additional_init_keys"] = defaults["output_grad_callbacks"] = None
    types = GradientSettings.__annotations__
    by_name = {p.name: p for p in rest if p.kind is p.KEYWORD_ONLY}
    out = [self_param]
    for name in names:
        if name in by_name:
            out.append(by_name[name].replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))
        else:
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
            out.append(inspect.Parameter(name, kind, default=defaults[name], annotation=types[name]))
    out.extend(p for p in rest if p.kind is p.KEYWORD_ONLY and p.name not in names)
    if takes_settings:
        seen = {p.name for p in out}
        out.extend(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=types[name])
            for name, default in defaults.items()
            if name not in seen
        )
    return own.replace(parameters=out)


def positive_int(value: Any, name: str, *, optional: bool = False, example: int = 8) -> int | None:
    """``value`` if it is a positive int (or ``None`` when ``optional``).

    Raises:
        AttributionError: Otherwise (a ``ValueError``), with an example value.
    """
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AttributionError(
            f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}. "
            f"Pass e.g. {name}={example}."
        )
    return value


def noise_stdevs(value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0 (a noise standard deviation).

    Raises:
        AttributionError: Otherwise (a ``ValueError``).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise AttributionError(
            f"stdevs must be a finite number >= 0 (the noise standard deviation), got {value!r}. "
            "Pass e.g. stdevs=0.1 (0: no noise)."
        )
    return float(value)


def parse_targets(targets: Any, separate: bool = False) -> int | list[int] | torch.Tensor | None:
    """Validate ``targets=`` once, at construction, and give it one meaning.

    * ``None``: every output element (the gradient of their sum);
    * an ``int`` (or a 0-dim integer tensor): that index of the last output dimension;
    * a list/tuple of ints: those indices, summed (one map each with ``separate_targets``);
    * an integer tensor (or NumPy array) with one or more dimensions: **per-sample** indices,
      one per sample (shape ``B``, or ``(prod(B),)``), as captum's ``target=`` tensor.

    Raises:
        TargetError: For a string, a float, a bool, a non-integer tensor, an empty list, or a
            per-sample tensor combined with ``separate_targets`` (a ``ValueError``).
    """
    if targets is None:
        return None
    if type(targets).__module__ == "numpy" and hasattr(targets, "ndim"):  # an array reads as a tensor
        targets = torch.as_tensor(targets)
    if isinstance(targets, torch.Tensor):
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TargetError(
                f"targets tensor has dtype {targets.dtype}, expected integer class indices. Convert it: "
                "targets=labels.long()."
            )
        if targets.dim() == 0:
            return int(targets)
        if separate:
            raise TargetError(
                f"separate_targets=True takes a list of output indices, not a per-sample tensor (got shape "
                f"{tuple(targets.shape)}). Use targets=[i, j, ...] with separate_targets, or the tensor alone."
            )
        return targets.detach().long()
    if isinstance(targets, (str, bytes)):
        raise TargetError(
            f"targets={targets!r} is a string; expected an int output index, a list of ints, or an integer "
            f"tensor with one index per sample. Write targets=int({targets!r}) if you mean one index."
        )
    if isinstance(targets, Sequence) or (hasattr(targets, "__iter__") and not isinstance(targets, Mapping)):
        values = list(targets)
        if not values:
            raise TargetError("targets is empty; pass at least one output index, or None.")
        return [_target_index(v) for v in values]
    return _target_index(targets)


def _target_index(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TargetError(
            f"targets entry {value!r} is a bool; expected an int output index (e.g. targets=1)."
        )
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise TargetError(
            f"targets entry {value!r} ({type(value).__name__}) is not an int output index; a float is never "
            "rounded. Pass int indices (targets=[3]) or an integer tensor with one index per sample."
        ) from None


def module_names(value: Any, what: str) -> list[str]:
    """A list of module paths: one string is ONE path (never its characters).

    Raises:
        AttributionError: For an entry that is not a string (a ``ValueError``).
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        value = list(value)
    if not isinstance(value, Iterable):
        raise AttributionError(
            f"{what} must be a module path or a list of module paths, got {type(value).__name__} {value!r}. "
            f"Write {what}=['fc1', ...]."
        )
    names = list(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise AttributionError(
            f"{what} must hold module paths (strings), got {bad[0]!r} ({type(bad[0]).__name__}) in {names!r}. "
            f"Write {what}=['fc1', ...]."
        )
    return names
