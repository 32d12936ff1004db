"""Weight edits for the duration of a context: adapters, pruning and task vectors.

Every edit is undone on exit, also when the ``with`` body raised: parameters are bit-identical
afterwards, with their ``requires_grad`` flags and gradients.
"""

from ._adapters import Adapters
from ._edits import swap_tensor
from ._pruning import Pruning
from ._task_vectors import TaskVectors

__all__ = ["Adapters", "Pruning", "TaskVectors", "swap_tensor"]
