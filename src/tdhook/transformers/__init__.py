"""Mechanistic interpretability on transformers: head targets, logit lens, attribution patching, generation.

Works on Hugging Face models (GPT-2 and Llama-style layouts are recognised; describe others with
a :class:`TransformerSpec`) and on any model whose layout a spec describes. Importing this module
does not import ``transformers``. See ``docs/transformers.md``.
"""

from ._attribution_patching import AttributionPatching
from ._generation import PromptPatch
from ._heads import (
    AblationMode,
    HeadAblation,
    HeadCaching,
    HeadPatching,
    InvalidAblationModeError,
    split_heads,
)
from ._lens import LogitLens, logit_lens
from ._spec import HeadIndexError, TransformerSpec, UnknownArchitectureError

__all__ = [
    "AblationMode",
    "AttributionPatching",
    "HeadAblation",
    "HeadCaching",
    "HeadIndexError",
    "HeadPatching",
    "InvalidAblationModeError",
    "LogitLens",
    "PromptPatch",
    "TransformerSpec",
    "UnknownArchitectureError",
    "logit_lens",
    "split_heads",
]
