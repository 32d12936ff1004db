"""Compatibility path (tdhook 0.1): ``tdhook.weights.pruning``."""

from ._pruning import Pruning, PruningAmountError, PruningContext, PruningSpecError

__all__ = ["Pruning", "PruningAmountError", "PruningContext", "PruningSpecError"]
