"""Layer-wise relevance propagation: the ``LRP`` method, rules, composites and canonizers.

Rules are small objects handed to one generic forward hook (:class:`RuleHook`); a rule mapper
(composite) chooses a rule per module; canonizers (``MergeBatchNorm``) put the model in the form
the rules expect. Everything is installed by the hooking core and undone at exit.

Examples:
    >>> import torch
    >>> from tensordict import TensorDict
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> with LRP(rule_mapper=EpsilonPlus(), targets=[0], init_relevance="outputs").prepare(model) as hooked:
    ...     td = hooked(TensorDict(input=torch.randn(5, 3), batch_size=[5]))
    >>> td["attr", "input"].shape
    torch.Size([5, 3])
"""

from ._canonizers import Canonizer, MergeBatchNorm, ParamModifier
from ._checks import raise_for_unconserved_rel_factory
from ._composites import (
    BaseRuleMapper,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    RuleMapper,
)
from ._errors import (
    CanonizerError,
    ConcurrentLRPError,
    RuleDefinitionError,
    RuleInputError,
    RuleMappingError,
    RuleParameterError,
    UnconservedRelevanceError,
    UnsupportedModuleError,
)
from ._layers import Sum
from ._lrp import LRP, MissingRuleWarning, RelevanceSeed
from ._rule import RemovableRuleHandle, Rule, RuleHook, bypass_rules, gradient_x_input, stabilize
from ._rule_names import RuleName, rule_from_name
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
from ._term_rules import AlphaBetaRule, FlatRule, GammaRule, WSquareRule, ZBoxRule, ZPlusRule
from ._types import (
    Activation,
    AvgPool,
    BatchNorm,
    Convolution,
    ConvolutionStandard,
    ConvolutionTranspose,
    Dense,
    Linear,
    MaxPool,
)

__all__ = [
    "LRP",
    "AHQKVInputRule",
    "AHQKVRule",
    "Activation",
    "AlphaBetaRule",
    "AvgPool",
    "BaseRuleMapper",
    "BatchNorm",
    "Canonizer",
    "CanonizerError",
    "ConcurrentLRPError",
    "Convolution",
    "ConvolutionStandard",
    "ConvolutionTranspose",
    "Dense",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonRule",
    "FlatRule",
    "GammaRule",
    "IgnoreRule",
    "LayerNormRule",
    "Linear",
    "MaxPool",
    "MergeBatchNorm",
    "MissingRuleWarning",
    "ParamModifier",
    "PassRule",
    "PseudoIdentityRule",
    "RelevanceSeed",
    "RemovableRuleHandle",
    "Rule",
    "RuleDefinitionError",
    "RuleHook",
    "RuleInputError",
    "RuleMapper",
    "RuleMappingError",
    "RuleName",
    "RuleParameterError",
    "SoftmaxEpsilonRule",
    "StopRule",
    "Sum",
    "UnconservedRelevanceError",
    "UniformEpsilonRule",
    "UniformRule",
    "UnsupportedModuleError",
    "WSquareRule",
    "ZBoxRule",
    "ZPlusRule",
    "bypass_rules",
    "gradient_x_input",
    "raise_for_unconserved_rel_factory",
    "rule_from_name",
    "stabilize",
]
