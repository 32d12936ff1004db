"""Activation caching: store the activations of every module matching a pattern."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tensordict import TensorDictBase
from tensordict.utils import NestedKey, unravel_key
from torch import nn

from .._core.directions import HookDirection, HookSpec
from .._core.factory import HookingContextFactory
from .._core.hook_types import CachingHook
from .._core.hooked import HookedModule
from .._core.lifecycle import HookingContext, HookingContextWithCache
from .._core.paths import compile_pattern, select_modules
from .._core.signatures import check_callback
from ..errors import InvalidInputError, InvalidParameterError
from ..targets import Target
from ._targeted import TargetCallback, check_cache_key, publish_cache, target_list

__all__ = ["ActivationCaching"]


class ActivationCaching(HookingContextFactory[HookingContextWithCache]):
    """Cache the activations of every module whose name matches ``key_pattern``.

    Results live in ``hooked.hooking_context.cache`` (or the ``cache`` you pass, which may be
    memory-mapped) and stay readable after the ``with`` block.

    Args:
        key_pattern: Regular expression matched with ``re.match`` against module names
            (relative to the model root, or absolute ``td_module.…`` names when ``relative`` is
            False). A pattern that matches nothing raises. Or a
            :class:`~tdhook.targets.Target` (or a list of them): each target's selected
            sub-tensor (units, a leaf of a tuple output) is cached under its ``module_path``;
            targeted caching is forward-only and needs ``relative=True``.
        relative: Match relative (True) or absolute names.
        cache: A TensorDict to write into, used by reference.
        callback: ``callback(module, args, output, key, direction)`` returning the value to
            store, e.g. ``lambda output, **_: output[0]`` to keep one entry of a tuple.
        directions: Hook points, among ``"fwd"``, ``"fwd_pre"``, ``"bwd"``, ``"bwd_pre"`` (and the
            ``_kwargs`` variants). Defaults to ``["fwd"]``; a single string is one direction.
        use_nested_keys: Store under ``(direction, name)`` rather than ``name`` (always the case
            with several directions).
        clear_cache: Clear the cache at every enter.
        accumulate: Concatenate along ``accumulate_dim`` across calls, instead of overwriting,
            so a dataset can be cached batch by batch.
        detach: Store detached tensors (no graph is kept alive).
        accumulate_dim: The dimension ``accumulate`` concatenates along: 0 (the batch) for a
            dataset, 1 (the sequence) for the steps of ``model.generate`` with a key-value cache,
            which gives the activations of the whole generated sequence.
        cache_key: Also publish a snapshot of the cache into each TensorDict the hooked module
            returns, under this key (e.g. ``"cache"``: ``("cache", "linear1")`` sits next to
            ``"output"``). ``None`` (the default) keeps tdhook 0.1's behaviour: the cache lives
            in the context only. A key overlapping a model input or output key raises
            :class:`~tdhook.errors.InvalidParameterError` (a ``ValueError``) at enter; entries
            must start with the call's batch dimensions, and ``accumulate=True`` is refused.

    Structured values (one rule, :func:`~tdhook._core.hook_types.nested_storable`): a tensor or a
    TensorDict is stored as it is; a tuple or list becomes nested entries ``"0"``, ``"1"``...,
    a mapping (a Hugging Face ``ModelOutput``) nested entries by key, recursively; ``None`` and
    other non-tensor values (key-value cache objects) are left out, and a value with no tensor
    at all is not stored. So ``ActivationCaching(".*")`` works on transformers: a GPT-2 attention
    module's ``(attn_output, None)`` is stored at ``(name, "0")``.

    A module that runs more than once in one forward pass is cached once per call: the first
    call under its key (``"fc"``), call ``k`` under ``"fc#k"`` (``("fwd", "fc#1")`` with nested
    keys); with ``accumulate``, each call is concatenated with the same call of earlier batches.
    Stored values equal the module's output when it was produced, even if the model later
    modifies it in place (``nn.ReLU(inplace=True)``).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> with ActivationCaching(r"\\d$").prepare(model) as hooked:
        ...     _ = hooked(TensorDict(input=torch.randn(2, 3), batch_size=[2]))
        >>> sorted(hooked.hooking_context.cache.keys())
        ['0', '1']
    """

    _hooking_context_class = HookingContextWithCache
    _thread_safe = True  # no per-call state on the instance

    def __init__(
        self,
        key_pattern: str | Target | Sequence[Target],
        relative: bool = True,
        cache: TensorDictBase | None = None,
        callback: Callable[..., Any] | None = None,
        directions: Sequence[str] | None = None,
        use_nested_keys: bool = False,
        clear_cache: bool = True,
        *,
        accumulate: bool = False,
        detach: bool = False,
        accumulate_dim: int = 0,
        cache_key: NestedKey | None = None,
    ) -> None:
        self._relative = relative
        self.key_pattern = key_pattern
        self._cache = cache
        self._clear_cache = clear_cache
        self._callback = callback
        if isinstance(directions, (str, HookDirection)):  # one direction, not its characters
            directions = [directions]
        self._directions = [HookDirection.parse(d) for d in (directions or ["fwd"])]
        for d in self._directions:
            check_callback(callback, d, ("key", "direction"))
        self._nested = use_nested_keys or len(self._directions) > 1
        self._accumulate = accumulate
        self._detach = detach
        if isinstance(accumulate_dim, bool) or not isinstance(accumulate_dim, int):
            raise InvalidInputError(
                f"accumulate_dim must be an int (0: batch, 1: sequence), got {accumulate_dim!r}."
            )
        self._accumulate_dim = accumulate_dim
        self._check_targets()
        if cache_key is not None and accumulate:
            raise InvalidParameterError(
                f"cache_key={cache_key!r} publishes the cache into each returned TensorDict, which needs entries of the call's "
                "batch; with accumulate=True they grow across calls. Read context.cache instead (cache_key=None)."
            )
        self._cache_key = None if cache_key is None else unravel_key(cache_key)

    @property
    def key_pattern(self) -> str | Sequence[str] | Target | Sequence[Target]:
        return self._key_pattern

    @key_pattern.setter
    def key_pattern(self, value: str | Sequence[str] | Target | Sequence[Target]) -> None:
        self._targets = target_list(value)
        if self._targets is None:
            compile_pattern(value)  # type: ignore[arg-type]  # patterns (str or list of str) checked here
        self._key_pattern = value
        if hasattr(self, "_directions"):
            self._check_targets()

    def _check_targets(self) -> None:
        """Targeted caching is forward-only and relative (checked at construction and on change)."""
        if self._targets is None:
            return
        if not self._relative:
            raise InvalidParameterError(
                "Caching Targets needs relative=True (got relative=False): a Target's module_path is relative to "
                "the model. Drop relative=False, or give absolute module patterns (str) instead of Targets."
            )
        if self._directions != [HookDirection.FWD]:
            raise InvalidParameterError(
                f"Caching Targets is forward-only (directions=['fwd']), got {[d.value for d in self._directions]}. "
                "Use tdhook.session.HookSession for inputs and gradients."
            )

    def _modules_to_cache(self, root: nn.Module) -> list[tuple[str, nn.Module, Callable[..., Any] | None]]:
        if self._targets is None:
            pattern: Any = self._key_pattern  # patterns, as given (targets are handled below)
            return [(name, module, self._callback) for name, module in select_modules(root, pattern)]
        return [(t.module_path, t.validate(root), TargetCallback(t, self._callback)) for t in self._targets]

    @staticmethod
    def _context_cache(context: HookingContext | None) -> TensorDictBase:
        if isinstance(context, HookingContextWithCache):
            return context.cache
        raise InvalidInputError(
            f"ActivationCaching needs a context with a cache, got {type(context).__name__}: use it through "
            "prepare(model), or pass cache=TensorDict() to ActivationCaching."
        )

    def _plan(self, hooked: HookedModule) -> list[HookSpec]:
        context = hooked.hooking_context
        cache = self._cache if self._cache is not None else self._context_cache(context)
        root = hooked.root if self._relative else hooked
        specs = []
        if self._cache_key is not None:
            check_cache_key(self._cache_key, [*hooked.in_keys, *hooked.out_keys])
        for direction in self._directions:
            for name, module, callback in self._modules_to_cache(root):
                key = (direction.value, name) if self._nested else name
                hook = CachingHook(
                    key,
                    cache,
                    direction,
                    callback,
                    self._detach,
                    self._accumulate,
                    nested=True,
                    accumulate_dim=self._accumulate_dim,
                    calls=hooked.calls,
                )
                specs.append(HookSpec(module, hook, direction))
        return specs

    def _call(
        self, hooked: HookedModule, td: TensorDictBase, call_next: Callable[..., Any], **kwargs: Any
    ) -> Any:
        result = call_next(td, **kwargs)
        if self._cache_key is not None:
            cache = self._cache if self._cache is not None else self._context_cache(hooked.hooking_context)
            publish_cache(result, self._cache_key, cache)
        return result
