"""Attribution: gradient methods, perturbation methods and LRP, for any model.

Every method reads the model inputs (and ``("baseline", k)`` where relevant) and writes
``("attr", k)`` into the caller's TensorDict, next to the model outputs::

    with IntegratedGradients(targets=[3]).prepare(model) as hooked:
        td = hooked(td)
    td["attr", "input"]
"""

from ._engine import GradientAttribution
from ._errors import AttributionError, AttributionKeys, BaselineError, IntegerInputError, TargetError
from ._grad_cam import DimsConfig, GradCAM
from ._gradient import InputXGradient, Saliency
from ._guided import GuidedBackpropagation
from ._integrated import IntegratedGradients
from ._maximisation import ActivationMaximisation
from ._noise import SmoothGrad, VarGrad
from ._options import GradientOptions
from ._perturbation import FeatureAblation, Occlusion
from ._quadrature import IntegrationMethod
from ._rl import action_log_prob_target, advantage_target, state_value_target
from ._shap import GradientShap
from .lrp import LRP

__all__ = [
    "LRP",
    "ActivationMaximisation",
    "AttributionError",
    "AttributionKeys",
    "BaselineError",
    "DimsConfig",
    "FeatureAblation",
    "GradCAM",
    "GradientAttribution",
    "GradientOptions",
    "GradientShap",
    "GuidedBackpropagation",
    "InputXGradient",
    "IntegerInputError",
    "IntegratedGradients",
    "IntegrationMethod",
    "Occlusion",
    "Saliency",
    "SmoothGrad",
    "TargetError",
    "VarGrad",
    "action_log_prob_target",
    "advantage_target",
    "state_value_target",
]
