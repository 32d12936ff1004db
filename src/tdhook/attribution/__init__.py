"""Attribution: gradient methods, perturbation methods and LRP, for any model.

Every method reads the model inputs (and ``("baseline", k)`` where relevant) and writes
``("attr", k)`` into the caller's TensorDict, next to the model outputs::

    with IntegratedGradients(targets=[3]).prepare(model) as hooked:
        td = hooked(td)
    td["attr", "input"]
"""

from ._errors import AttributionError, AttributionKeys, BaselineError, IntegerInputError, TargetError
from ._gradient import GradientAttribution, InputXGradient, Saliency
from ._integrated import IntegratedGradients, IntegrationMethod

__all__ = [
    "AttributionError",
    "AttributionKeys",
    "BaselineError",
    "GradientAttribution",
    "InputXGradient",
    "IntegerInputError",
    "IntegratedGradients",
    "IntegrationMethod",
    "Saliency",
    "TargetError",
]
