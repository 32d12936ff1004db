"""LRP rules by name: :class:`RuleName` and :func:`rule_from_name` (part of :mod:`tdhook.attribution.lrp`)."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from ._errors import RuleMappingError
from ._rule import Rule
from ._rules import (
    AHQKVInputRule,
    AHQKVRule,
    EpsilonRule,
    IgnoreRule,
    LayerNormRule,
    PassRule,
    PseudoIdentityRule,
    SoftmaxEpsilonRule,
    StopRule,
    UniformEpsilonRule,
    UniformRule,
)
from ._term_rules import AlphaBetaRule, FlatRule, GammaRule, WSquareRule, ZPlusRule

__all__ = ["RuleName", "rule_from_name"]


class RuleName(str, Enum):
    """Names accepted where a rule is expected (a rule mapper may return one)."""

    EPSILON = "epsilon"
    UNIFORM_EPSILON = "uniform_epsilon"
    PASS = "pass"
    IGNORE = "ignore"
    STOP = "stop"
    UNIFORM = "uniform"
    ZPLUS = "zplus"
    ALPHA2_BETA1 = "alpha2_beta1"
    GAMMA = "gamma"
    WSQUARE = "wsquare"
    FLAT = "flat"
    SOFTMAX_EPSILON = "softmax_epsilon"
    LAYER_NORM = "layer_norm"
    PSEUDO_IDENTITY = "pseudo_identity"
    AHQKV = "ahqkv"
    AHQKV_INPUT = "ahqkv_input"


_BY_NAME: dict[RuleName, Callable[[], Rule]] = {
    RuleName.EPSILON: EpsilonRule,
    RuleName.UNIFORM_EPSILON: UniformEpsilonRule,
    RuleName.PASS: PassRule,
    RuleName.IGNORE: IgnoreRule,
    RuleName.STOP: StopRule,
    RuleName.UNIFORM: UniformRule,
    RuleName.ZPLUS: ZPlusRule,
    RuleName.ALPHA2_BETA1: AlphaBetaRule,
    RuleName.GAMMA: GammaRule,
    RuleName.WSQUARE: WSquareRule,
    RuleName.FLAT: FlatRule,
    RuleName.SOFTMAX_EPSILON: SoftmaxEpsilonRule,
    RuleName.LAYER_NORM: LayerNormRule,
    RuleName.PSEUDO_IDENTITY: PseudoIdentityRule,
    RuleName.AHQKV: AHQKVRule,
    RuleName.AHQKV_INPUT: AHQKVInputRule,
}


def rule_from_name(name: str | RuleName) -> Rule:
    """Build the rule called ``name`` with its default parameters.

    Raises:
        RuleMappingError: For an unknown name; the message lists the valid ones.

    Examples:
        >>> rule_from_name("epsilon")
        EpsilonRule(epsilon=1e-06)
    """
    try:
        key = RuleName(name)
    except ValueError:
        raise RuleMappingError(
            f"Unknown LRP rule name {name!r}. Expected one of {[n.value for n in RuleName]}, or a Rule "
            "instance such as EpsilonRule(epsilon=1e-6)."
        ) from None
    factory = _BY_NAME.get(key)
    if factory is None:  # every member has a factory; keep dispatch total
        raise RuleMappingError(
            f"No factory for LRP rule name {key.value!r}; pass a Rule instance instead (e.g. EpsilonRule())."
        )
    return factory()
