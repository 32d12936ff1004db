"""The hook core's public face: the canonical import path of everything a new method builds on.

tdhook's layers, from the ground up (see ``docs/architecture.md``):

1. hook points and installation: :class:`HookDirection`, :class:`HookSpec` (what to hook),
   :func:`install` (register a plan) and :class:`HandleGroup` (remove it, in reverse order);
   the ready-made hook values (:class:`CachingHook`, :class:`SettingHook`, ...);
2. module paths (:func:`parse_path`, :func:`resolve_path`, :func:`select_modules`) and keys
   (:func:`check_keys`, :func:`normalize_keys`);
3. the lifecycle: a :class:`HookingContextFactory` plans, its :class:`HookingContext` installs
   the plan on enter and undoes everything on exit, the :class:`HookedModule` is what the
   ``with`` block calls.

The implementation lives in the private package ``tdhook._core`` and may be reorganised; import
from here (or from tdhook 0.1's paths ``tdhook.contexts``, ``tdhook.modules`` and
``tdhook.hooks``, which stay as compatibility modules and give the same objects).

Examples:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> from tdhook.core import HookDirection, HookingContextFactory, HookSpec, SettingHook
    >>> class Double(HookingContextFactory):
    ...     def _plan(self, hooked):
    ...         hook = SettingHook(None, HookDirection.FWD, callback=lambda output, **_: 2 * output)
    ...         return [HookSpec(hooked.root, hook, HookDirection.FWD)]
    >>> model = torch.nn.Linear(2, 1)
    >>> x = TensorDict(input=torch.ones(1, 2), batch_size=[1])
    >>> with Double().prepare(model) as hooked:
    ...     doubled = hooked(x.clone())["output"]
    >>> torch.equal(doubled, 2 * model(torch.ones(1, 2)))
    True
"""

from __future__ import annotations

from ._core.boundary import wrap_module
from ._core.cache import CacheProxy, MutableWeakRef, TensorDictRef
from ._core.directions import HandleGroup, HookDirection, HookSpec, Installable, install, register
from ._core.extensions import Extension
from ._core.factory import CompositeHookingContextFactory, HookingContextFactory
from ._core.hook_types import CachingHook, EarlyStoppingException, ReadingHook, SettingHook, StoppingHook
from ._core.hooked import HookedModule
from ._core.keys import DEFAULT_IN_KEY, DEFAULT_OUT_KEY, check_keys, normalize_keys
from ._core.lifecycle import HookingContext, HookingContextWithCache
from ._core.paths import PathStep, join_paths, parse_path, resolve_path, select_modules
from ._core.run import HookedModuleRun
from ._core.signatures import check_callback, check_keywords

__all__ = [
    "DEFAULT_IN_KEY",
    "DEFAULT_OUT_KEY",
    "CacheProxy",
    "CachingHook",
    "CompositeHookingContextFactory",
    "EarlyStoppingException",
    "Extension",
    "HandleGroup",
    "HookDirection",
    "HookSpec",
    "HookedModule",
    "HookedModuleRun",
    "HookingContext",
    "HookingContextFactory",
    "HookingContextWithCache",
    "Installable",
    "MutableWeakRef",
    "PathStep",
    "ReadingHook",
    "SettingHook",
    "StoppingHook",
    "TensorDictRef",
    "check_callback",
    "check_keys",
    "check_keywords",
    "install",
    "join_paths",
    "normalize_keys",
    "parse_path",
    "register",
    "resolve_path",
    "select_modules",
    "wrap_module",
]
