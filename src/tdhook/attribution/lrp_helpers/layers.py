"""tdhook 0.1 path of the LRP helper layers; they live in :mod:`tdhook.attribution.lrp`."""

from ..lrp import Sum

__all__ = ["Sum"]
