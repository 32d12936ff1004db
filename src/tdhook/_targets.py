"""Reusable model targets: "these units of this value of this module", as a frozen value.

A :class:`Target` names a module (by path, in the grammar of :mod:`tdhook._core.paths`), what
to read there (an activation, a gradient or a parameter), where the tensor sits inside a
structured value (``output_path``), which units along which axis (``feature_axis`` and
``indices``) and, for a module called several times per forward, which calls
(``occurrences``). A target never installs a hook itself: :class:`tdhook.session.HookSession`
and the activation methods read it. It serialises to JSON and back.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from ._core.paths import parse_path, resolve_path
from .errors import InvalidInputError, ModulePathError, TargetError

__all__ = ["Target", "TargetKind", "map_leaf"]


class TargetKind(str, Enum):
    """What a target reads: a module's activation, a gradient, or one of its parameters."""

    ACTIVATION = "activation"
    GRADIENT = "gradient"
    PARAMETER = "parameter"

    @classmethod
    def parse(cls, value: Any) -> TargetKind:
        """Convert ``"activation"``/``"gradient"``/``"parameter"`` (or a member) to a member.

        Raises:
            TargetError: For any other value; the message lists the valid ones.
        """
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise TargetError(
                f"Invalid target kind {value!r}: expected one of {[k.value for k in cls]}."
            ) from None


_FIELDS = ("module_path", "kind", "feature_axis", "indices", "parameter", "output_path", "occurrences")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any, name: str, *, allow_none: bool) -> tuple[int, ...] | None:
    if value is None:
        if allow_none:
            return None
        raise InvalidInputError(f"Target {name} must be a non-empty tuple of ints, got None.")
    if _is_int(value):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        raise InvalidInputError(f"Target {name} must be a tuple of ints, e.g. (0, 3), got {value!r}.")
    return tuple(int(v) for v in value)


def _is_structured(value: Any) -> bool:
    return isinstance(value, (tuple, list, Mapping, TensorDictBase))


def _same_sequence(original: Sequence[Any], items: list[Any]) -> Any:
    """A container of ``original``'s type holding ``items`` (list, tuple, namedtuple, structseq)."""
    if type(original) is list:
        return items
    if type(original) is tuple:
        return tuple(items)
    if isinstance(original, tuple) and hasattr(original, "_fields"):  # namedtuple
        return type(original)(*items)
    factory: Any = type(original)
    return factory(items)


@dataclass(frozen=True)
class Target:
    """One reusable description of "these units of this value of this module".

    Args:
        module_path: Path of the module inside the model, e.g. ``"layers[-1].mlp"`` (``""`` is
            the model itself).
        kind: ``"activation"`` (a forward value), ``"gradient"`` (a backward value) or
            ``"parameter"`` (one of the module's parameters, named by ``parameter``).
        feature_axis: The axis ``indices`` select along: ``-1`` for MLP units, ``1`` for CNN
            channels, ``0``/``1`` for parameter rows or columns.
        indices: The selected units (a non-empty tuple of distinct ints; negative ints count from
            the end). ``None`` selects the whole tensor (``feature_axis`` is then unused).
        parameter: The parameter's name (``"weight"``), required for the parameter kind only.
        output_path: Where the tensor sits in a structured value: int slots of tuples and lists,
            str keys of mappings and TensorDicts, e.g. ``(0,)`` for a transformer block's hidden
            states. A one-element tuple needs no path; any other structured value without a path
            is refused.
        occurrences: For a module called several times in one forward of the model, the
            zero-based call indices to act on (strictly increasing); ``None`` means every call.

    Lists are accepted for the tuple fields (and converted), so the target stays hashable.
    Every field is checked here; ranges (an axis or index beyond the tensor) are checked when
    the target is applied, or by :meth:`validate` for parameters.

    Raises:
        TargetError: For a bad value (unknown kind, empty or repeated indices, a parameter name
            on an activation target...).
        InvalidInputError: For a field of the wrong type.
        ModulePathError: If ``module_path`` is not in the path grammar.

    Examples:
        >>> import torch
        >>> t = Target("0", "activation", feature_axis=-1, indices=(1, 3))
        >>> t.select_output(torch.arange(8.0).reshape(2, 4))
        tensor([[1., 3.],
                [5., 7.]])
        >>> Target.from_json(t.to_json()) == t
        True
    """

    module_path: str
    kind: TargetKind | str = TargetKind.ACTIVATION
    feature_axis: int = -1
    indices: tuple[int, ...] | None = None
    parameter: str | None = None
    output_path: tuple[int | str, ...] = ()
    occurrences: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module_path, str):
            raise InvalidInputError(
                f"Target module_path must be a str such as 'layers[0].fc', got {type(self.module_path).__name__}."
            )
        parse_path(self.module_path)  # grammar check (ModulePathError)
        kind = TargetKind.parse(self.kind)
        object.__setattr__(self, "kind", kind)
        if not _is_int(self.feature_axis):
            raise InvalidInputError(f"Target feature_axis must be an int, got {self.feature_axis!r}.")
        indices = _int_tuple(self.indices, "indices", allow_none=True)
        if indices is not None:
            if not indices:
                raise TargetError("Target indices must be non-empty; use indices=None for the whole tensor.")
            if len(set(indices)) != len(indices):
                raise TargetError(f"Target indices must be distinct, got {indices}.")
        object.__setattr__(self, "indices", indices)
        path = self.output_path
        if isinstance(path, (str, int)):
            path = (path,)
        if not isinstance(path, (tuple, list)) or not all(_is_int(s) or isinstance(s, str) for s in path):
            raise InvalidInputError(
                f"Target output_path must be a tuple of int slots and str keys, e.g. (0,) or ('logits',), "
                f"got {self.output_path!r}."
            )
        object.__setattr__(self, "output_path", tuple(path))
        occurrences = _int_tuple(self.occurrences, "occurrences", allow_none=True)
        if occurrences is not None:
            if not occurrences or any(o < 0 for o in occurrences):
                raise TargetError(
                    f"Target occurrences must be non-negative call indices, got {occurrences}; use None for every call."
                )
            if any(b <= a for a, b in itertools.pairwise(occurrences)):
                raise TargetError(f"Target occurrences must be strictly increasing, got {occurrences}.")
        object.__setattr__(self, "occurrences", occurrences)
        if kind is TargetKind.PARAMETER:
            if not isinstance(self.parameter, str) or not self.parameter:
                raise TargetError(
                    f"A parameter target needs parameter='<name>' (e.g. 'weight'), got {self.parameter!r}."
                )
            if self.output_path or self.occurrences is not None:
                raise TargetError(
                    "A parameter target selects from the parameter tensor itself: output_path and occurrences "
                    f"do not apply (got output_path={self.output_path!r}, occurrences={self.occurrences!r})."
                )
        elif self.parameter is not None:
            raise TargetError(
                f"parameter={self.parameter!r} is only meaningful for kind='parameter', not {kind.value!r}."
            )

    # -- description ------------------------------------------------------------------------------
    @property
    def kind_value(self) -> str:
        """``"activation"``, ``"gradient"`` or ``"parameter"``."""
        return TargetKind.parse(self.kind).value

    def __str__(self) -> str:
        parts = [self.kind_value, repr(self.module_path)]
        if self.parameter:
            parts.append(f"parameter={self.parameter!r}")
        if self.output_path:
            parts.append(f"output_path={self.output_path!r}")
        if self.indices is not None:
            parts.append(f"indices={self.indices} on axis {self.feature_axis}")
        if self.occurrences is not None:
            parts.append(f"occurrences={self.occurrences}")
        return "Target(" + ", ".join(parts) + ")"

    # -- model ------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> nn.Module:
        """Resolve the module in ``model`` (and check the parameter); return the module.

        Raises:
            ModulePathError: If the path does not lead to a submodule (the message lists the
                nearest module names).
            TargetError: If the parameter does not exist, or the axis or an index does not fit it.
        """
        try:
            module = resolve_path(model, self.module_path)
        except ModulePathError as err:
            raise ModulePathError(f"{self}: {err}") from None
        if self.kind is TargetKind.PARAMETER:
            self.parameter_tensor(module)
        return module

    def parameter_tensor(self, module: nn.Module) -> nn.Parameter:
        """The parameter a parameter target names on ``module`` (ranges checked)."""
        name = self.parameter or ""
        try:
            param = module.get_parameter(name)
        except AttributeError:
            names = [n for n, _ in module.named_parameters()]
            raise TargetError(
                f"{self}: module {self.module_path!r} ({type(module).__name__}) has no parameter {name!r}; "
                f"its parameters are {names}."
            ) from None
        if self.indices is not None:
            self._positions(param)
        return param

    # -- values -----------------------------------------------------------------------------------
    def leaf(self, value: Any) -> torch.Tensor:
        """The tensor at ``output_path`` inside ``value`` (whole, before unit selection)."""
        node = value
        for depth, step in enumerate(self.output_path):
            node = self._step(node, step, depth)
        if not self.output_path and isinstance(node, (tuple, list)) and len(node) == 1:
            node = node[0]
        if not isinstance(node, torch.Tensor):
            raise TargetError(self._not_a_tensor(node))
        return node

    def select_output(self, value: Any) -> torch.Tensor:
        """The selected sub-tensor of ``value`` (an output, an input tuple, a gradient, a parameter).

        The selected axis keeps its dimension: units ``(1, 3)`` of ``[B, D]`` give ``[B, 2]``.
        The result is a new tensor (``index_select``) that stays in the autograd graph; without
        ``indices`` the tensor itself is returned.

        Raises:
            TargetError: If the path does not lead to a tensor, or the axis or an index is out of
                range.
        """
        leaf = self.leaf(value)
        if self.indices is None:
            return leaf
        axis, positions = self._positions(leaf)
        return leaf.index_select(axis, positions)

    def replace_output(self, value: Any, replacement: Any) -> Any:
        """A copy of ``value`` in which only the selected entries are ``replacement``.

        The container (tuple, namedtuple, list, dict, TensorDict) keeps its type and every other
        item; ``value`` itself is not modified. ``replacement`` is a tensor that broadcasts to
        the selected shape, or a Python number. The new leaf is built out of place, so
        gradients flow to ``replacement`` (and to the kept entries).

        Raises:
            TargetError: If the path does not lead to a tensor, the axis or an index is out of
                range, or ``replacement`` does not broadcast to the selected shape.
            InvalidInputError: If ``replacement`` is neither a tensor nor a number.
        """
        return self._rebuild(value, self.output_path, lambda leaf: self._replaced_leaf(leaf, replacement))

    def map_output(self, value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
        """``replace_output(value, fn(select_output(value)))``, reading the leaf once."""
        return self._rebuild(
            value, self.output_path, lambda leaf: self._replaced_leaf(leaf, fn(self._select_leaf(leaf)))
        )

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict of the fields (tuples as lists)."""
        return {
            "module_path": self.module_path,
            "kind": self.kind_value,
            "feature_axis": self.feature_axis,
            "indices": None if self.indices is None else list(self.indices),
            "parameter": self.parameter,
            "output_path": list(self.output_path),
            "occurrences": None if self.occurrences is None else list(self.occurrences),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        """Build a target from :meth:`to_dict`'s output (fields checked as in the constructor).

        Raises:
            TargetError: If ``data`` has an unknown key or lacks ``module_path``.
            InvalidInputError: If ``data`` is not a mapping.
        """
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"Target.from_dict expects a mapping, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown or "module_path" not in data:
            problem = f"unknown key(s) {unknown}" if unknown else "no 'module_path'"
            raise TargetError(
                f"Cannot build a Target from {dict(data)!r}: {problem}. Valid keys: {list(_FIELDS)}."
            )
        return cls(**dict(data))

    def to_json(self) -> str:
        """The target as a JSON object (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Target:
        """Build a target from :meth:`to_json`'s output."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise TargetError(f"Target.from_json expects a JSON object, got {text!r} ({err}).") from None
        return cls.from_dict(data)

    # -- internals --------------------------------------------------------------------------------
    def _step(self, node: Any, step: int | str, depth: int) -> Any:
        where = f"output_path{self.output_path[: depth + 1]!r} of {self}"
        if isinstance(step, int):
            if not isinstance(node, (tuple, list)):
                raise TargetError(f"{where}: slot {step} needs a tuple or list, got {type(node).__name__}.")
            if not -len(node) <= step < len(node):
                raise TargetError(
                    f"{where}: slot {step} is out of range for a {type(node).__name__} of {len(node)}."
                )
            return node[step]
        if isinstance(node, TensorDictBase):
            if step not in node:
                raise TargetError(
                    f"{where}: key {step!r} not in the TensorDict; keys: {sorted(node.keys())}."
                )
            return node.get(step)
        if isinstance(node, Mapping):
            if step not in node:
                raise TargetError(f"{where}: key {step!r} not in the mapping; keys: {list(node.keys())}.")
            return node[step]
        raise TargetError(
            f"{where}: key {step!r} needs a mapping or a TensorDict, got {type(node).__name__}."
        )

    def _not_a_tensor(self, node: Any) -> str:
        if _is_structured(node):
            size = f" of {len(node)} items" if isinstance(node, (tuple, list)) else ""
            slots = "(0,)" if isinstance(node, (tuple, list)) else f"({next(iter(node.keys()), 'key')!r},)"
            return (
                f"{self} reaches a {type(node).__name__}{size}, not a tensor. Give output_path to pick one tensor, "
                f"e.g. output_path={slots}."
            )
        return f"{self} reaches a {type(node).__name__}, not a tensor; check module_path and output_path."

    def _positions(self, leaf: torch.Tensor) -> tuple[int, torch.Tensor]:
        assert self.indices is not None
        ndim = leaf.ndim
        axis = self.feature_axis + ndim if self.feature_axis < 0 else self.feature_axis
        if not 0 <= axis < ndim:
            raise TargetError(
                f"{self}: feature_axis {self.feature_axis} is out of range for a tensor of shape "
                f"{tuple(leaf.shape)} ({ndim} dims)."
            )
        size = leaf.shape[axis]
        positions = [i + size if i < 0 else i for i in self.indices]
        bad = [i for i, p in zip(self.indices, positions) if not 0 <= p < size]
        if bad:
            raise TargetError(
                f"{self}: indices {bad} are out of range for axis {self.feature_axis} of size {size} "
                f"(tensor shape {tuple(leaf.shape)})."
            )
        if len(set(positions)) != len(positions):
            raise TargetError(
                f"{self}: indices {self.indices} name the same unit twice on an axis of size {size}."
            )
        return axis, torch.tensor(positions, device=leaf.device)

    def _select_leaf(self, leaf: torch.Tensor) -> torch.Tensor:
        if self.indices is None:
            return leaf
        axis, positions = self._positions(leaf)
        return leaf.index_select(axis, positions)

    def _replaced_leaf(self, leaf: torch.Tensor, replacement: Any) -> torch.Tensor:
        if isinstance(replacement, torch.Tensor):
            new = replacement.to(device=leaf.device, dtype=leaf.dtype)
        elif isinstance(replacement, (int, float)) and not isinstance(replacement, bool):
            new = torch.tensor(replacement, device=leaf.device, dtype=leaf.dtype)
        else:
            raise InvalidInputError(
                f"{self}: a replacement must be a tensor or a number, got {type(replacement).__name__}."
            )
        if self.indices is None:
            shape = leaf.shape
        else:
            axis, positions = self._positions(leaf)
            shape = torch.Size((*leaf.shape[:axis], len(positions), *leaf.shape[axis + 1 :]))
        try:
            fits = torch.broadcast_shapes(new.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise TargetError(
                f"{self}: the replacement of shape {tuple(new.shape)} does not broadcast to the selected shape "
                f"{tuple(shape)}. Give a tensor of that shape (or one that broadcasts to it, e.g. a scalar)."
            )
        if self.indices is None:
            return new.expand(shape).clone()
        return leaf.index_copy(axis, positions, new.expand(shape))

    def _rebuild(
        self, value: Any, path: tuple[int | str, ...], leaf_fn: Callable[[torch.Tensor], Any]
    ) -> Any:
        if not path:
            if isinstance(value, (tuple, list)) and len(value) == 1:
                return _same_sequence(value, [self._rebuild(value[0], (), leaf_fn)])
            if not isinstance(value, torch.Tensor):
                raise TargetError(self._not_a_tensor(value))
            return leaf_fn(value)
        depth = len(self.output_path) - len(path)
        step, rest = path[0], path[1:]
        child = self._step(value, step, depth)
        new_child = self._rebuild(child, rest, leaf_fn)
        if isinstance(step, int):
            items = list(value)
            items[step] = new_child
            return _same_sequence(value, items)
        if isinstance(value, TensorDictBase):
            out = value.copy()
            out.set(step, new_child)
            return out
        out = copy.copy(value)
        out[step] = new_child
        return out


def map_leaf(target: Target, value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of ``value`` whose whole leaf at ``target.output_path`` is ``fn(leaf)`` (no unit selection)."""
    return target._rebuild(value, target.output_path, fn)
