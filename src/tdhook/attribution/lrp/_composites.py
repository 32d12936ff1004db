"""Rule mappers ("composites"): which rule each layer of a model gets (part of :mod:`tdhook.attribution.lrp`).

A rule mapper is any callable ``(name, module) -> Rule | str | None`` (names are those of
``named_modules()`` of the TensorDict-level model, e.g. ``"module.0"``). :class:`BaseRuleMapper`
adds the defaults every composite shares (activations pass relevance through, pooling and
:class:`~tdhook.attribution.lrp.Sum` use ε...) and tries a user mapper first. The composites map
convolutions and dense layers, and optionally the first linear layer, to specific rules:

=========================  ==================  ============  ==========
composite                  first linear layer  convolutions  dense
=========================  ==================  ============  ==========
``EpsilonPlus``            (as the others)     z⁺            ε
``EpsilonPlusFlat``        flat                z⁺            ε
``EpsilonAlpha2Beta1``     (as the others)     α2β1          ε
``EpsilonAlpha2Beta1Flat`` flat                α2β1          ε
``EpsilonGammaBox``        z^B (bounds)        γ             ε
=========================  ==================  ============  ==========
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._layers import Sum
from ._rule import Rule
from ._rules import EpsilonRule, IgnoreRule, PassRule
from ._term_rules import AlphaBetaRule, FlatRule, GammaRule, ZBoxRule, ZPlusRule
from ._types import Activation, AvgPool, BatchNorm, Convolution, Dense, Linear, MaxPool

__all__ = [
    "BaseRuleMapper",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "RuleMapper",
]

#: ``(name, module) -> Rule | str | None``: the rule mapper protocol.
RuleMapper = Callable[[str, nn.Module], Any]

_IGNORED: tuple[type[nn.Module], ...] = (*MaxPool, nn.Identity, nn.Dropout, nn.Flatten)


class BaseRuleMapper:
    """The shared defaults, after an optional user mapper.

    * ``Activation`` and ``BatchNorm`` → :class:`PassRule`;
    * ``MaxPool``, ``nn.Identity``, ``nn.Dropout``, ``nn.Flatten`` → :class:`IgnoreRule`;
    * :class:`Sum` and ``AvgPool`` → ``EpsilonRule(stabilizer)``;
    * anything else → ``None`` (composites add their own layer rules first).

    Args:
        stabilizer: ε of the pooling/Sum rule and stabiliser of the composites' rules.
        rule_mapper: Tried first; its non-``None`` answers win.

    Examples:
        >>> mapper = EpsilonPlus()
        >>> mapper("module.0", torch.nn.Linear(2, 2))
        EpsilonRule(epsilon=1e-06)
    """

    def __init__(self, stabilizer: float = 1e-6, rule_mapper: RuleMapper | None = None) -> None:
        self.stabilizer = stabilizer
        self.rule_mapper = rule_mapper
        self._pass = PassRule()
        self._ignore = IgnoreRule()
        self._sum = EpsilonRule(stabilizer)
        self._conv: Rule | None = None
        self._dense: Rule | None = None
        self._first: Rule | None = None
        self._first_seen = False
        self._current_first = False

    def _configure(self, *, conv: Rule | None, dense: Rule | None, first: Rule | None = None) -> None:
        self._conv, self._dense, self._first = conv, dense, first

    def reset(self) -> None:
        """Forget which layer came first (LRP calls this before every walk over a model)."""
        self._first_seen = False

    def __call__(self, name: str, module: nn.Module) -> Any:
        first = False
        if not self._first_seen and isinstance(module, Linear):
            self._first_seen = True
            first = True
        if self.rule_mapper is not None:
            rule = self.rule_mapper(name, module)
            if rule is not None:
                return rule
        self._current_first = first
        return self._call(name, module)

    def _call(self, name: str, module: nn.Module) -> Any:
        """The default rule of ``module`` (after the user mapper), or ``None``.

        tdhook 0.1's extension point: a subclass overrides ``_call`` and calls
        ``super()._call(name, module)`` for the defaults; ``__call__`` still tries the user
        ``rule_mapper`` first.
        """
        if self._current_first and self._first is not None:
            return self._first
        if self._conv is not None and isinstance(module, Convolution):
            return self._conv
        if self._dense is not None and isinstance(module, Dense):
            return self._dense
        if isinstance(module, (*Activation, *BatchNorm)):
            return self._pass
        if isinstance(module, _IGNORED):
            return self._ignore
        if isinstance(module, (Sum, *AvgPool)):
            return self._sum
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stabilizer={self.stabilizer!r}, rule_mapper={self.rule_mapper!r})"


class EpsilonPlus(BaseRuleMapper):
    """z⁺ for convolutions, ε for dense layers (zennit's ``EpsilonPlus``).

    Args:
        epsilon: ε of the dense layers.
        stabilizer: Stabiliser of z⁺ and of the shared defaults.
        rule_mapper: Tried first.
    """

    def __init__(
        self, epsilon: float = 1e-6, stabilizer: float = 1e-6, rule_mapper: RuleMapper | None = None
    ) -> None:
        super().__init__(stabilizer, rule_mapper)
        self.epsilon = epsilon
        self._configure(conv=ZPlusRule(stabilizer), dense=EpsilonRule(epsilon))


class EpsilonPlusFlat(BaseRuleMapper):
    """:class:`EpsilonPlus` with the flat rule on the first linear layer (zennit's ``EpsilonPlusFlat``)."""

    def __init__(
        self, epsilon: float = 1e-6, stabilizer: float = 1e-6, rule_mapper: RuleMapper | None = None
    ) -> None:
        super().__init__(stabilizer, rule_mapper)
        self.epsilon = epsilon
        self._configure(conv=ZPlusRule(stabilizer), dense=EpsilonRule(epsilon), first=FlatRule(stabilizer))


class EpsilonAlpha2Beta1(BaseRuleMapper):
    """α2β1 for convolutions, ε for dense layers (zennit's ``EpsilonAlpha2Beta1``)."""

    def __init__(
        self, epsilon: float = 1e-6, stabilizer: float = 1e-6, rule_mapper: RuleMapper | None = None
    ) -> None:
        super().__init__(stabilizer, rule_mapper)
        self.epsilon = epsilon
        self._configure(conv=AlphaBetaRule(2.0, 1.0, stabilizer), dense=EpsilonRule(epsilon))


class EpsilonAlpha2Beta1Flat(BaseRuleMapper):
    """:class:`EpsilonAlpha2Beta1` with the flat rule on the first linear layer."""

    def __init__(
        self, epsilon: float = 1e-6, stabilizer: float = 1e-6, rule_mapper: RuleMapper | None = None
    ) -> None:
        super().__init__(stabilizer, rule_mapper)
        self.epsilon = epsilon
        self._configure(
            conv=AlphaBetaRule(2.0, 1.0, stabilizer), dense=EpsilonRule(epsilon), first=FlatRule(stabilizer)
        )


class EpsilonGammaBox(BaseRuleMapper):
    """z^B on the first linear layer, γ for convolutions, ε for dense layers (zennit's ``EpsilonGammaBox``).

    Args:
        low: Lowest input value (scalar or tensor broadcastable to the input), e.g. the
            normalised value of a black pixel.
        high: Highest input value.
        epsilon: ε of the dense layers.
        gamma: γ of the convolutions.
        stabilizer: Stabiliser of z^B, γ and the shared defaults.
        rule_mapper: Tried first.
    """

    def __init__(
        self,
        low: torch.Tensor | float,
        high: torch.Tensor | float,
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        stabilizer: float = 1e-6,
        rule_mapper: RuleMapper | None = None,
    ) -> None:
        super().__init__(stabilizer, rule_mapper)
        self.epsilon = epsilon
        self.gamma = gamma
        self._configure(
            conv=GammaRule(gamma, stabilizer),
            dense=EpsilonRule(epsilon),
            first=ZBoxRule(low, high, stabilizer),
        )
