"""``LRP``: layer-wise relevance propagation as a parameterisation of the gradient engine.

Part of :mod:`tdhook.attribution.lrp`. At every enter, LRP walks ``named_modules()`` of the
TensorDict-level model, asks the rule mapper for each module's rule and plans, in this order:
the canonizers' edits, ``inplace=False`` on in-place activations, one :meth:`Rule.bind` per ruled
module, then the gradient engine's capture hooks (so targets and ``input_modules`` see the rules'
outputs). The core installs the plan and
undoes it in reverse at exit, also after an exception; ``forward`` is never patched.

The relevance flowing backwards is the "gradient" of the engine: ``(attr, k)`` is the relevance
of input ``k``. The initial relevance is the seed (ones by default, as in tdhook 0.1).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from typing_extensions import Unpack

from ...core import HookedModule, Installable
from ...errors import TdhookWarning
from .._engine import GradientAttribution
from .._errors import AttributionError
from .._options import SHARED_POSITIONAL, GradientOptions, GradientSettings, accepts_positional
from ._canonizers import Canonizer, _Assign, _Canonize
from ._composites import BaseRuleMapper, RuleMapper
from ._errors import ConcurrentLRPError, RuleMappingError
from ._rule import Rule
from ._rule_names import RuleName, rule_from_name

__all__ = ["LRP", "MissingRuleWarning", "RelevanceSeed"]


class MissingRuleWarning(TdhookWarning):
    """Leaf modules got no LRP rule: their ordinary gradient carries the relevance."""


class RelevanceSeed(str, Enum):
    """The initial relevance at the targets when ``init_attr_grads`` is not given.

    ``ONES``: one for every target (or for the ``targets`` indices), as tdhook 0.1 did.
    ``OUTPUTS``: the target values themselves (the logits; only the ``targets`` indices if given),
    the usual LRP convention; same as ``init_attr_grads=lambda targets, _: targets``.
    """

    ONES = "ones"
    OUTPUTS = "outputs"

    @classmethod
    def parse(cls, value: str | RelevanceSeed) -> RelevanceSeed:
        try:
            return cls(value)
        except ValueError:
            raise AttributionError(
                f"Unknown init_relevance {value!r}; expected one of {[s.value for s in cls]}, e.g. "
                "init_relevance='outputs'."
            ) from None


_CONTAINER_NAMES = frozenset({"", "td_module", "module"})
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict, TensorDictModule)


SkipFn = Callable[[str, nn.Module], bool]


def default_skip(name: str, module: nn.Module) -> bool:
    """True for containers: ``nn.Sequential``/``ModuleList``/``ModuleDict``/``TensorDictModule``,
    and the wrapper names ``""``, ``"td_module"``, ``"module"`` when they have submodules (a
    model that is a single layer still gets its rule)."""
    if isinstance(module, _CONTAINERS):
        return True
    return name in _CONTAINER_NAMES and next(module.children(), None) is not None


@dataclass(frozen=True)
class _LRPEdits:
    """LRP's model edits, planned at every enter (see the module docstring for the order)."""

    rule_mapper: RuleMapper | None
    warn_on_missing_rule: bool
    skip_modules: SkipFn
    canonizers: tuple[Canonizer, ...]

    def rules(self, hooked: HookedModule) -> list[tuple[str, nn.Module, Rule]]:
        mapper = self.rule_mapper
        if isinstance(mapper, BaseRuleMapper):
            mapper.reset()
        ruled: list[tuple[str, nn.Module, Rule]] = []
        missing: list[str] = []
        for name, module in hooked.td_module.named_modules():
            if self.skip_modules(name, module):
                continue
            rule = _as_rule(mapper(name, module), name, module) if mapper is not None else None
            if rule is None:
                if next(module.children(), None) is None:
                    missing.append(f"`{name}` ({type(module).__name__})")
                continue
            ruled.append((name, module, rule))
        if missing and self.warn_on_missing_rule:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            warnings.warn(
                f"No rule found for {len(missing)} module(s): {shown}. Their plain gradient carries the "
                "relevance. Pass rule_mapper=EpsilonPlus() (or map them), or warn_on_missing_rule=False.",
                MissingRuleWarning,
                stacklevel=5,
            )
        return ruled

    def __call__(self, hooked: HookedModule) -> list[Installable]:
        ruled = self.rules(hooked)
        # First: refuse (before any edit) a model that another LRP context is explaining.
        plan: list[Installable] = [_LRPClaim(tuple(hooked.td_module.modules()))]
        # Canonizers compute their edits from the model when installed, atomically with other
        # threads' edits (a model it cannot canonize is refused there, and the claim undone).
        plan.extend(_Canonize(canonizer, hooked.root) for canonizer in self.canonizers)
        # In-place activations would apply their own backward to the relevance a rule hands to
        # their (already overwritten) input; run them out of place while the context is active.
        plan.extend(
            _Assign(module, "inplace", False)
            for _, module in hooked.td_module.named_modules()
            if _inplace_torch_module(module)
        )
        plan.extend(rule.bind(module) for _, module, rule in ruled if rule.installs_hook)
        return plan


class LRP(GradientAttribution):
    """Layer-wise relevance propagation (Bach et al., 2015) with per-module rules.

    The relevance is the engine's "gradient": the rules (installed as model edits while the
    context is active) make the backward pass carry relevance, and ``(attr, k)`` is the relevance
    of input ``k``. The shared settings (``targets``, ``init_attr_grads``...) are those of
    :class:`~tdhook.attribution.GradientOptions`; tdhook 0.1's positional order (the shared
    arguments, then ``rule_mapper, warn_on_missing_rule, skip_modules``) is accepted too.

    Args:
        rule_mapper: ``(name, module) -> Rule | str | None`` for every module of the
            TensorDict-level model (names ``"module.0"``...), e.g. :class:`EpsilonPlus`. A string
            is a :class:`RuleName`. ``None``: no rule anywhere (plain gradient).
        warn_on_missing_rule: Warn (one :class:`MissingRuleWarning` listing them) about leaf
            modules that got no rule.
        skip_modules: ``(name, module) -> bool``; skipped modules get no rule and no warning.
            Default: :meth:`default_skip` (containers).
        canonizers: Reversible edits applied around the context, e.g. ``[MergeBatchNorm()]``.
        init_relevance: Seed when ``init_attr_grads`` is not given: ``"ones"`` (tdhook 0.1) or
            ``"outputs"`` (the target values, e.g. the logit of the ``targets`` class).
        options: A ready :class:`~tdhook.attribution.GradientOptions`.
        **settings: The shared settings, see :class:`~tdhook.attribution.GradientOptions`.

    Raises:
        RuleMappingError: For a ``rule_mapper`` that is not callable; at enter, when the mapper
            returns something that is not a rule.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tdhook.attribution.lrp import EpsilonPlus
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> with LRP(rule_mapper=EpsilonPlus(), targets=[1], init_relevance="outputs").prepare(model) as hooked:
        ...     td = hooked(TensorDict(input=torch.randn(5, 3), batch_size=[5]))
        >>> td["attr", "input"].shape
        torch.Size([5, 3])
    """

    default_skip = staticmethod(default_skip)

    @accepts_positional(*SHARED_POSITIONAL, "rule_mapper", "warn_on_missing_rule", "skip_modules")
    def __init__(
        self,
        *,
        rule_mapper: RuleMapper | None = None,
        warn_on_missing_rule: bool = True,
        skip_modules: SkipFn | None = None,
        canonizers: Sequence[Canonizer] = (),
        init_relevance: str | RelevanceSeed = RelevanceSeed.ONES,
        options: GradientOptions | None = None,
        **settings: Unpack[GradientSettings],
    ) -> None:
        if rule_mapper is not None and not callable(rule_mapper):
            raise RuleMappingError(
                f"rule_mapper must be callable as (name, module) -> Rule | None, got {type(rule_mapper).__name__}. "
                "Pass e.g. EpsilonPlus() or a function."
            )
        if skip_modules is not None and not callable(skip_modules):
            raise AttributionError(
                f"skip_modules must be callable as (name, module) -> bool, got {type(skip_modules).__name__}. "
                "Pass e.g. LRP.default_skip."
            )
        for canonizer in canonizers:
            if not isinstance(canonizer, Canonizer):
                raise AttributionError(
                    f"canonizers must be Canonizer instances (e.g. MergeBatchNorm()), got {type(canonizer).__name__}."
                )
        self.rule_mapper = rule_mapper
        self.warn_on_missing_rule = bool(warn_on_missing_rule)
        self.skip_modules = skip_modules if skip_modules is not None else default_skip
        self.canonizers = tuple(canonizers)
        self.init_relevance = RelevanceSeed.parse(init_relevance)
        self._configure(
            GradientOptions.build(options, settings, type(self).__name__),
            edits_before=_LRPEdits(
                rule_mapper, self.warn_on_missing_rule, self.skip_modules, self.canonizers
            ),
            seed_times_target=self.init_relevance is RelevanceSeed.OUTPUTS,
        )

    @staticmethod
    def seed_with_outputs(targets: TensorDictBase, additional: TensorDictBase) -> TensorDictBase:
        """An ``init_attr_grads`` seeding each target with its own (detached) value."""
        return targets.detach()


#: Modules under an active LRP context (rules on them, canonizer edits), from any thread.
_CLAIMED: weakref.WeakKeyDictionary[nn.Module, _LRPClaim] = weakref.WeakKeyDictionary()
_CLAIM_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class _LRPClaim:
    """Installable: mark ``modules`` as explained by one LRP context; refuse overlapping contexts.

    Two active LRP contexts on one model would stack their rules (each rule-carrying module
    would apply two rules in the backward pass) and interleave their edits, so the second one is
    refused at entry, before it changes anything, in any thread.
    """

    modules: tuple[nn.Module, ...]

    def install(self) -> _LRPClaim:
        with _CLAIM_LOCK:
            busy = next((m for m in self.modules if m in _CLAIMED), None)
            if busy is not None:
                raise ConcurrentLRPError(
                    f"{type(busy).__name__} is already explained by another active LRP context; a second one "
                    "would stack its rules on the same modules and give wrong relevances. Exit the first "
                    "context before entering this one, or use a copy of the model (copy.deepcopy(model))."
                )
            for module in self.modules:
                _CLAIMED[module] = self
        return self

    def remove(self) -> None:
        with _CLAIM_LOCK:
            for module in self.modules:
                if _CLAIMED.get(module) is self:
                    del _CLAIMED[module]


def _inplace_torch_module(module: nn.Module) -> bool:
    """A torch activation/dropout set to run in place (not tensordict's ``inplace`` option)."""
    return (
        type(module).__module__.startswith("torch.nn.modules.") and getattr(module, "inplace", None) is True
    )


def _as_rule(value: Any, name: str, module: nn.Module) -> Rule | None:
    if value is None or isinstance(value, Rule):
        return value
    if isinstance(value, (str, RuleName)):
        try:
            return rule_from_name(value)
        except RuleMappingError as err:
            raise RuleMappingError(
                f"rule_mapper for module `{name}` ({type(module).__name__}): {err}"
            ) from None
    hint = (
        f"return an instance, e.g. {value.__name__}()"
        if isinstance(value, type) and issubclass(value, Rule)
        else "return a Rule instance (e.g. EpsilonRule()), a rule name such as 'epsilon', or None"
    )
    raise RuleMappingError(
        f"rule_mapper returned {value!r} ({type(value).__name__}) for module `{name}` "
        f"({type(module).__name__}), expected a Rule or None: {hint}."
    )
