"""Input checks shared across the package (dimension, similarity, streaming statistics, probes, store).

Every public estimator calls these at its boundary, so the messages are the same everywhere:
they name the offending key or argument, what was expected, and one fix. The errors they raise
live in :mod:`tdhook.errors`.
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any, TypeVar

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import Tensor

from .errors import InvalidInputError, InvalidParameterError, MissingKeyError, NonFiniteInputError

__all__ = [
    "as_float",
    "as_tensor",
    "check_chunk_size",
    "check_finite",
    "check_number",
    "check_positive_int",
    "format_repr",
    "parse_choice",
    "read_key",
    "suffix_key",
]


def as_float(x: Tensor) -> Tensor:
    """Return ``x`` unchanged if it is floating point, else promoted to ``float32``."""
    return x if x.is_floating_point() else x.to(torch.float32)


def as_tensor(x: Any, *, name: str) -> Tensor:
    """Convert an array-like (tensor, numpy array, nested list) to a tensor.

    Args:
        x: The value.
        name: Argument name used in the error message.

    Returns:
        ``x`` itself when it is a tensor, else ``torch.as_tensor(x)``.

    Raises:
        InvalidInputError: If ``x`` cannot be converted.
    """
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidInputError(
            f"{name} must be a tensor or an array-like of numbers, got {type(x).__name__}; "
            f"convert it with torch.as_tensor(...) first."
        ) from err


_E = TypeVar("_E", bound=enum.Enum)


def parse_choice(kind: type[_E], value: Any, *, name: str) -> _E:
    """``kind(value)``: a member of the enum ``kind`` from itself or its value, converted once at the boundary.

    Raises:
        InvalidParameterError: For any other value; the message lists the valid ones.
    """
    try:
        return kind(value)
    except ValueError:
        valid = [c.value for c in kind]
        raise InvalidParameterError(f"Unknown {name}: {value!r}; expected one of {valid}.") from None


def check_finite(x: Tensor, *, name: str, expected: str | None = None) -> None:
    """Raise :class:`NonFiniteInputError` if ``x`` holds a NaN or an infinity.

    Args:
        x: The tensor to check.
        name: How the message names it (a TensorDict key or an argument name).
        expected: What the message says instead of the default expectation and fix.

    Raises:
        NonFiniteInputError: With the number of bad values and a fix.
    """
    if x.is_floating_point() or x.is_complex():
        if x.numel() == 0 or bool(torch.isfinite(x.sum())):
            return  # a finite sum proves every element finite (NaN and ±inf propagate)
        finite = torch.isfinite(x)
        if not bool(finite.all()):  # else: the sum overflowed on finite values
            n_bad = int((~finite).sum())
            raise NonFiniteInputError(
                f"{name} contains {n_bad} non-finite value(s) (NaN or inf) out of {x.numel()}; "
                + (
                    expected
                    or "finite values are required. Drop or impute them first, e.g. keep the rows "
                    "x[torch.isfinite(x).all(-1)]."
                )
            )


def check_positive_int(value: Any, *, name: str, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) of at least ``minimum``.

    Raises:
        InvalidInputError: If it is not an integer (a ``TypeError``).
        InvalidParameterError: If it is smaller than ``minimum`` (a ``ValueError``).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(
            f"{name} must be an int >= {minimum}, got {value!r} of type {type(value).__name__}."
        )
    if value < minimum:
        raise InvalidParameterError(f"{name} must be an int >= {minimum}, got {value}.")
    return value


def check_number(
    value: Any,
    *,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
    hint: str = "",
) -> float:
    """Return ``value`` as a float if it is a finite real number within the range.

    Args:
        value: The value passed by the user.
        name: The argument name for the message.
        minimum: Smallest valid value (excluded when ``strict``).
        maximum: Largest valid value (always included).
        strict: Exclude ``minimum`` itself.
        hint: One fix, appended to the message.

    Raises:
        InvalidParameterError: If ``value`` is not a real number (bools and strings included),
            NaN, infinite or out of range (a ``ValueError``).
    """
    low = "" if minimum is None else f"{'>' if strict else '>='} {minimum}"
    high = "" if maximum is None else f"<= {maximum}"
    expected = (
        "a finite number"
        + (f" {low}" if low else "")
        + (f" and {high}" if low and high else f" {high}" if high else "")
    )
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        raise InvalidParameterError(
            f"{name} must be {expected}, got {value!r}." + (f" {hint}" if hint else "")
        )
    return float(value)


def check_chunk_size(chunk_size: Any) -> int | None:
    """Validate an optional positive chunk size."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise InvalidParameterError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    return chunk_size


def format_repr(obj: Any, **fields: Any) -> str:
    """``Name(in_keys=[...], out_keys=[...], field=value, ...)`` for the TensorDict-module estimators."""
    parts = [f"in_keys={list(obj.in_keys)}", f"out_keys={list(obj.out_keys)}"]
    parts += [f"{name}={value!r}" for name, value in fields.items()]
    return f"{type(obj).__name__}({', '.join(parts)})"


def read_key(td: TensorDictBase, key: NestedKey, *, owner: str) -> Tensor:
    """Read ``td[key]`` as a tensor, with a helpful error when the key is absent.

    Args:
        td: The TensorDict.
        key: The key to read.
        owner: Name of the estimator, for the message.

    Raises:
        MissingKeyError: Listing the keys present.
        InvalidInputError: If the entry is not a tensor.
    """
    if key not in td.keys(include_nested=True):
        present = list(td.keys(include_nested=True, leaves_only=True))
        raise MissingKeyError(
            f"{owner} reads {key!r}, which is not in the TensorDict; keys present: {present}. "
            f"Store the data under {key!r}, or pass the key to the constructor (e.g. in_key=...)."
        )
    value = td.get(key)
    if not isinstance(value, Tensor):
        raise InvalidInputError(f"{owner} expects a tensor at {key!r}, got {type(value).__name__}.")
    return value


def suffix_key(key: NestedKey, suffix: str) -> NestedKey:
    """Append ``suffix`` to the last element of a (possibly nested) key: ``("a", "b")`` → ``("a", "b_x")``."""
    if isinstance(key, str):
        return key + suffix
    return (*key[:-1], key[-1] + suffix)
