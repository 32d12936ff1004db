"""Task arithmetic: task vectors, forget vectors and the control-adequacy search of their scale.

A task vector is ``finetuned_weights - weights``; adding ``alpha`` times a sum of task vectors to
the weights adds the tasks, subtracting it (a *forget* vector) removes them. The scale ``alpha``
is chosen among candidates: the best test accuracy among the scales whose edited model still
passes a control-adequacy check (e.g. accuracy on a control task above a threshold).

Weights are TensorDicts keyed like the model (``("0", "weight")``): every parameter and every
floating-point buffer. Edits are swapped in and out (see :mod:`tdhook.weights._edits`), never
written into the user's tensors, and every tensor is restored on exit, even after an exception.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from .._core.directions import Installable
from .._core.extensions import Extension
from .._core.factory import HookingContextFactory
from .._core.hooked import HookedModule
from .._core.lifecycle import HookingContext
from ..errors import ContextStateError, InvalidInputError, TdhookError
from ._edits import ParameterSnapshot, WeightSwap, named_tensors
from ._standalone import StandaloneHookedModule

__all__ = [
    "NoAdequateAlphaError",
    "TaskVectorError",
    "TaskVectorTools",
    "TaskVectors",
    "TaskVectorsContext",
    "TaskVectorsModule",
]


class NoAdequateAlphaError(TdhookError, RuntimeError):
    """No candidate scale satisfies the control-adequacy criterion."""


class TaskVectorError(TdhookError, ValueError):
    """A task vector or scale does not fit the model (keys, shapes, NaN/Inf values)."""


def _check_alpha(alpha: Any, what: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(float(alpha)):
        raise TaskVectorError(f"{what} must be a finite number, got {alpha!r}. Example: 0.5.")
    return float(alpha)


def _key(name: str) -> tuple[str, ...]:
    return tuple(name.split("."))


def _weights_of(tensors: dict[str, torch.Tensor]) -> TensorDict:
    return TensorDict({_key(n): t.detach() for n, t in tensors.items()}, batch_size=[])


def _find_factory(hooked: HookedModule) -> TaskVectors:
    context = hooked.hooking_context
    if context is not None:
        for factory in context.factory.components:
            if isinstance(factory, TaskVectors):
                return factory
    raise ContextStateError(
        "Module was not prepared with TaskVectors, so alpha cannot be searched. Pass alpha=..., or use "
        "`with TaskVectors(alphas, get_test_accuracy, get_control_adequacy).prepare(model) as hooked:`."
    )


class TaskVectorTools(Extension):
    """Builds and applies task vectors on a hooked module (the extension :class:`TaskVectors` adds).

    ``weights`` is the model's state when TaskVectors' edits were installed (in a composite:
    after the edits of the methods listed before it, as with nested ``with`` blocks), detached
    and sharing memory with the tensors of that moment: nothing is copied. The hooked module
    forwards the names in :attr:`exposes` (``hooked.get_task_vector(...)``);
    ``hooked.extension(TaskVectorTools)`` is the typed way to reach them.
    """

    exposes = ("get_forget_vector", "get_task_vector", "get_weights", "weights", "with_applied_vectors")

    def __init__(self, hooked: HookedModule) -> None:
        super().__init__(hooked)
        self._names: list[str] = []
        self._weights: TensorDict | None = None
        self._open_swaps: list[Any] = []

    def capture(self) -> None:
        """Take the weights now, unless they were taken already (idempotent)."""
        if self._weights is None:
            tensors = named_tensors(self.hooked.root)
            self._names = list(tensors)
            self._weights = _weights_of(tensors)

    @property
    def weights(self) -> TensorDict:
        """The weights TaskVectors works from, keyed like the model (``("0", "weight")``)."""
        self.capture()
        assert self._weights is not None
        return self._weights

    def _as_weights(self, finetuned: nn.Module | TensorDictBase) -> TensorDictBase:
        if isinstance(finetuned, nn.Module):
            other: TensorDictBase = _weights_of(named_tensors(finetuned))
        elif isinstance(finetuned, TensorDictBase):
            other = finetuned
        else:
            raise InvalidInputError(
                f"Expected a fine-tuned nn.Module (same architecture) or a TensorDict of weights, got "
                f"{type(finetuned).__name__} {finetuned!r:.40}. Pass the fine-tuned model, or "
                "TensorDict.from_module(finetuned)."
            )
        self._check_like_weights(other, "The fine-tuned weights")
        return other

    def _check_like_weights(self, other: TensorDictBase, what: str) -> None:
        """``other`` has the model's tensors (keys and shapes) and only finite values."""
        mine = set(self.weights.keys(include_nested=True, leaves_only=True))
        theirs = set(other.keys(include_nested=True, leaves_only=True))
        if mine != theirs:
            raise TaskVectorError(
                f"{what} do not match the model: missing {sorted(mine - theirs)[:5]}, unexpected "
                f"{sorted(theirs - mine)[:5]}. Fine-tune a copy of the same architecture (copy.deepcopy(model))."
            )
        for key in sorted(mine):
            value, want = other.get(key), self.weights.get(key)
            if not isinstance(value, torch.Tensor) or value.shape != want.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise TaskVectorError(
                    f"{what} do not match the model: {'.'.join(key)} has shape {shape}, expected "
                    f"{tuple(want.shape)}. Build vectors from a copy of the same architecture."
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TaskVectorError(
                    f"{what} have NaN or infinite entries in {'.'.join(key)}; nothing was applied. Check the "
                    "fine-tuned model."
                )

    def get_task_vector(self, finetuned: nn.Module | TensorDictBase) -> TensorDictBase:
        """``weights(finetuned) - weights``.

        Raises:
            TaskVectorError: If ``finetuned`` does not have the model's tensors (names and shapes),
                or has NaN/Inf values.
        """
        other = self._as_weights(finetuned)
        return other.detach() - self.weights

    def get_forget_vector(self, finetuned: nn.Module | TensorDictBase) -> TensorDictBase:
        """``weights - weights(finetuned)``: the negated task vector."""
        return -self.get_task_vector(finetuned)

    def get_weights(self, *vectors: TensorDictBase, alpha: float | None = None) -> TensorDictBase:
        """``weights + alpha * sum(vectors)``; ``alpha=None`` searches it (see :meth:`TaskVectors.compute_alpha`).

        Raises:
            TaskVectorError: If a vector does not have the model's tensors (names and shapes),
                ``alpha`` is not a finite number, or a result is NaN/Inf.
            ContextStateError: If ``alpha`` is None and the module was not prepared with TaskVectors.
            NoAdequateAlphaError: If no candidate alpha is adequate.
        """
        if not vectors:
            raise TaskVectorError(
                "get_weights needs at least one task vector, e.g. hooked.get_task_vector(finetuned)."
            )
        for i, vector in enumerate(vectors):
            if not isinstance(vector, TensorDictBase):
                raise InvalidInputError(
                    f"Task vector {i} must be a TensorDict (hooked.get_task_vector(finetuned)), got "
                    f"{type(vector).__name__}."
                )
            self._check_like_weights(vector, f"Task vector {i}")
        if alpha is not None:
            alpha = _check_alpha(alpha, "alpha")
        total = vectors[0]
        for vector in vectors[1:]:
            total = total + vector
        if alpha is None:
            alpha = _find_factory(self.hooked).compute_alpha(self.hooked, total)
        weights = self.weights + alpha * total
        self._check_like_weights(weights, f"The weights for alpha={alpha}")
        return weights

    @contextlib.contextmanager
    def with_applied_vectors(
        self, *vectors: TensorDictBase, alpha: float | None = None
    ) -> Iterator[HookedModule]:
        """Load ``weights + alpha * sum(vectors)`` into the model for the ``with`` body, then restore.

        The values are absolute: for the tensors it loads, the swap replaces the edits made
        before it (an edit made after it is applied again on top when the swap is undone).
        """
        weights = self.get_weights(*vectors, alpha=alpha)
        handle = WeightSwap(self.hooked.root, {n: weights.get(_key(n)) for n in self._names}).install()
        open_swaps = self._open_swaps
        open_swaps.append(handle)
        try:
            yield self.hooked
        finally:
            handle.remove()
            if handle in open_swaps:
                open_swaps.remove(handle)

    def _close_open_swaps(self) -> None:
        """Undo the vectors still applied (a ``with_applied_vectors`` never exited), newest first."""
        open_swaps = self._open_swaps
        while open_swaps:
            open_swaps.pop().remove()


@dataclass(frozen=True, eq=False)
class _Capture:
    """An installable that takes TaskVectors' weights when the plan is installed (undo: nothing)."""

    tools: TaskVectorTools

    def install(self) -> _Capture:
        self.tools.capture()
        return self

    def remove(self) -> None:
        pass


@dataclass(frozen=True, eq=False)
class _OpenSwaps:
    """An installable whose undo closes the vectors still applied (newest first)."""

    tools: TaskVectorTools

    def install(self) -> _OpenSwaps:
        return self

    def remove(self) -> None:
        self.tools._close_open_swaps()


class TaskVectorsModule(StandaloneHookedModule):
    """A hooked module with :class:`TaskVectorTools`, for use without a context (tdhook 0.1 name).

    Its weights are taken when it is built. Inside ``with TaskVectors(...).prepare(model) as
    hooked:``, ``hooked`` is a plain :class:`~tdhook.core.HookedModule` carrying the
    :class:`TaskVectorTools` extension, so that TaskVectors composes with every other method; the
    names below work on both.
    """

    extension_kind = TaskVectorTools

    def _attached(self, extension: Any) -> None:
        extension.capture()

    @property
    def weights(self) -> TensorDict:
        """The weights when the module was built (see :attr:`TaskVectorTools.weights`)."""
        return self.extension(TaskVectorTools).weights

    def get_task_vector(self, finetuned: nn.Module | TensorDictBase) -> TensorDictBase:
        """``weights(finetuned) - weights`` (see :meth:`TaskVectorTools.get_task_vector`)."""
        return self.extension(TaskVectorTools).get_task_vector(finetuned)

    def get_forget_vector(self, finetuned: nn.Module | TensorDictBase) -> TensorDictBase:
        """``weights - weights(finetuned)`` (see :meth:`TaskVectorTools.get_forget_vector`)."""
        return self.extension(TaskVectorTools).get_forget_vector(finetuned)

    def get_weights(self, *vectors: TensorDictBase, alpha: float | None = None) -> TensorDictBase:
        """``weights + alpha * sum(vectors)`` (see :meth:`TaskVectorTools.get_weights`)."""
        return self.extension(TaskVectorTools).get_weights(*vectors, alpha=alpha)

    def with_applied_vectors(
        self, *vectors: TensorDictBase, alpha: float | None = None
    ) -> contextlib.AbstractContextManager[HookedModule]:
        """Load ``weights + alpha * sum(vectors)`` for the ``with`` body (see :class:`TaskVectorTools`)."""
        return self.extension(TaskVectorTools).with_applied_vectors(*vectors, alpha=alpha)


class TaskVectorsContext(HookingContext):
    """The context of :class:`TaskVectors`, with :meth:`compute_alpha`."""

    def compute_alpha(self, vector: TensorDictBase) -> float:
        """The best adequate scale of ``vector`` (see :meth:`TaskVectors.compute_alpha`).

        Raises:
            ContextStateError: Outside the context.
        """
        hooked = self.hooked_module
        if hooked is None:
            raise ContextStateError(
                "Cannot compute alpha outside of context: call it inside the `with` block."
            )
        return _find_factory(hooked).compute_alpha(hooked, vector)


class TaskVectors(HookingContextFactory[TaskVectorsContext]):
    """Task arithmetic with a control-adequacy search of the scale.

    Inside the context, ``hooked`` (with the :class:`TaskVectorTools` extension) builds task vectors from
    fine-tuned copies of the model and applies them temporarily. ``alpha=None`` searches the
    scale: for each candidate in ``alphas`` (in order) the vector is applied, the candidate is
    kept if ``get_control_adequacy(hooked)`` is true, and the kept candidate with the highest
    ``get_test_accuracy(hooked)`` wins (the first one on ties). The search is recorded in
    :attr:`search_results`.

    Args:
        alphas: Candidate scales.
        get_test_accuracy: ``(hooked) -> float``, higher is better.
        get_control_adequacy: ``(hooked) -> bool``.

    Raises:
        TaskVectorError: If ``alphas`` is empty, not numbers, or not finite.
        TypeError: If a callback is not callable.

    Examples:
        >>> import copy, torch
        >>> model = torch.nn.Linear(2, 1)
        >>> finetuned = copy.deepcopy(model)
        >>> with torch.no_grad():
        ...     _ = finetuned.weight.add_(1.0)
        >>> method = TaskVectors([0.5, 1.0], lambda h: -float(h.module.weight.detach().abs().sum()), lambda h: True)
        >>> with method.prepare(model) as hooked:
        ...     vector = hooked.get_task_vector(finetuned)
        ...     alpha = hooked.hooking_context.compute_alpha(vector)
        >>> alpha in (0.5, 1.0)
        True
    """

    _hooking_context_class = TaskVectorsContext

    def __init__(
        self,
        alphas: Sequence[float],
        get_test_accuracy: Callable[[HookedModule], float],
        get_control_adequacy: Callable[[HookedModule], bool],
    ) -> None:
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable):
            raise TaskVectorError(
                f"alphas must be a non-empty list of numbers, got {alphas!r}. Example: [0.1, 0.2, 0.5, 1.0]."
            )
        alphas = list(alphas)
        if not alphas or not all(isinstance(a, numbers.Real) and not isinstance(a, bool) for a in alphas):
            raise TaskVectorError(
                f"alphas must be a non-empty list of numbers, got {alphas!r}. Example: [0.1, 0.2, 0.5, 1.0]."
            )
        for a in alphas:
            _check_alpha(a, f"Every alpha in alphas={alphas!r}")
        for name, fn in (
            ("get_test_accuracy", get_test_accuracy),
            ("get_control_adequacy", get_control_adequacy),
        ):
            if not callable(fn):
                raise InvalidInputError(
                    f"{name} must be callable as {name}(hooked) -> float, got {type(fn).__name__} {fn!r:.40}. "
                    f"Pass a function, e.g. {name}=lambda hooked: 0.9."
                )
        self._alphas = [float(a) for a in alphas]
        self._accuracy = get_test_accuracy
        self._adequacy = get_control_adequacy
        self._results: list[tuple[float, bool, float | None]] = []

    @property
    def alphas(self) -> list[float]:
        return list(self._alphas)

    @property
    def search_results(self) -> list[tuple[float, bool, float | None]]:
        """``(alpha, adequate, accuracy or None)`` for each candidate of the last search."""
        return list(self._results)

    def _plan(self, hooked: HookedModule) -> list[Installable]:
        tools = hooked.use_extension(TaskVectorTools)
        # The weights are taken when the plan is installed (after the edits listed before this
        # method). At exit, vectors still applied (a with_applied_vectors never exited) are undone
        # first, then the snapshot puts back every tensor's grad state. Both are edits of the
        # shared stack (see _edits), so they compose with other weight edits exited in any order.
        return [_Capture(tools), ParameterSnapshot(hooked.root), _OpenSwaps(tools)]

    def compute_alpha(self, hooked: HookedModule, vector: TensorDictBase) -> float:
        """Search the scale of ``vector`` on ``hooked`` (see the class docstring).

        Raises:
            ContextStateError: If ``hooked``'s context is not active.
            NoAdequateAlphaError: If no candidate is adequate; the message lists the candidates.
        """
        context = hooked.hooking_context
        if context is None or not context.is_active:
            raise ContextStateError(
                "Cannot compute alpha outside of context: call it inside the `with` block."
            )
        results: list[tuple[float, bool, float | None]] = []
        best: float | None = None
        best_accuracy = -float("inf")
        for alpha in self._alphas:
            with hooked.extension(TaskVectorTools).with_applied_vectors(vector, alpha=alpha):
                adequate = bool(self._adequacy(hooked))
                accuracy = float(self._accuracy(hooked)) if adequate else None
            results.append((alpha, adequate, accuracy))
            if accuracy is not None and (best is None or accuracy > best_accuracy):
                best, best_accuracy = alpha, accuracy
        self._results = results
        if best is None:
            raise NoAdequateAlphaError(
                f"No value satisfies the control adequacy criterion: none of alphas={self._alphas} passed "
                "get_control_adequacy. Try smaller alphas or a looser criterion."
            )
        return best
