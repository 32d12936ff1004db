"""Where things are in a transformer: layers, per-head attention sites, final norm, unembedding.

A :class:`TransformerSpec` names the module paths of one model family (relative to the model
given to ``prepare``), so head, lens and attribution-patching methods work on any model whose
layout is described, and :meth:`TransformerSpec.from_model` recognises the common Hugging Face
layouts: GPT-2 (``transformer.h[i].attn.c_proj``) and Llama-style decoders (Llama, Mistral,
Qwen2, Gemma...: ``model.layers[i].self_attn.o_proj``), with or without their LM head.

The per-head site is the *input* of the attention output projection (``c_proj`` / ``o_proj``):
there the heads' outputs are still separate, concatenated along the last dimension, so the
value seen as ``(..., n_heads, d_head)`` is head ``h``'s output ``z_h = softmax(q_h k_hᵀ) v_h``,
before the projection mixes the heads (TransformerLens's ``hook_z``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._core.paths import resolve_path
from ..errors import ModulePathError, TdhookError

__all__ = ["HeadIndexError", "TransformerSpec", "UnknownArchitectureError", "normalize_heads"]


class UnknownArchitectureError(TdhookError, ValueError):
    """``TransformerSpec.from_model`` does not recognise the model's layout."""


class HeadIndexError(TdhookError, ValueError):
    """A (layer, head) pair or a layer index is out of range or malformed."""


#: (layers container, attention output projection inside a layer, final norm, unembedding, embedding)
_LAYOUTS: tuple[tuple[str, str, str, str | None, str], ...] = (
    ("transformer.h", "attn.c_proj", "transformer.ln_f", "lm_head", "transformer.wte"),  # GPT2LMHeadModel
    ("h", "attn.c_proj", "ln_f", None, "wte"),  # GPT2Model
    (
        "model.layers",
        "self_attn.o_proj",
        "model.norm",
        "lm_head",
        "model.embed_tokens",
    ),  # LlamaForCausalLM...
    ("layers", "self_attn.o_proj", "norm", None, "embed_tokens"),  # LlamaModel...
)


@dataclass(frozen=True)
class TransformerSpec:
    """Module paths and head geometry of one decoder-only transformer.

    Paths are relative to the model given to ``prepare``; ``{i}`` stands for the layer index.

    Args:
        n_layers: Number of layers (blocks).
        n_heads: Attention heads per layer (query heads, for grouped-query attention).
        d_head: Dimension of one head's output.
        layer: Path of layer ``i`` (its output is the residual stream after the layer).
        head_input: Path of the module whose *input* is the concatenation of the heads' outputs
            in layer ``i`` (the attention output projection).
        final_norm: Path of the final norm (applied before the unembedding), or None.
        unembed: Path of the unembedding (LM head), or None for a model without one.
        embed: Path of the token embedding.

    Examples:
        >>> spec = TransformerSpec(2, 4, 8, "blocks[{i}]", "blocks[{i}].attn.out", "ln_f", "unembed", "embed")
        >>> spec.layer_path(1), spec.head_input_path(-1)
        ('blocks[1]', 'blocks[1].attn.out')
    """

    n_layers: int
    n_heads: int
    d_head: int
    layer: str
    head_input: str
    final_norm: str | None
    unembed: str | None
    embed: str

    @classmethod
    def from_model(cls, model: nn.Module) -> TransformerSpec:
        """Recognise a Hugging Face GPT-2 or Llama-style model (with or without its LM head).

        Raises:
            UnknownArchitectureError: For another layout; build a ``TransformerSpec`` by hand.
        """
        names = dict(model.named_modules())
        config = getattr(model, "config", None)
        for layers, proj, norm, unembed, embed in _LAYOUTS:
            container = names.get(layers)
            if not isinstance(container, nn.ModuleList) or f"{layers}.0.{proj}" not in names:
                continue
            if config is None:
                break
            n_heads = int(config.num_attention_heads)
            hidden = int(config.hidden_size)
            d_head = getattr(config, "head_dim", None) or hidden // n_heads
            return cls(
                n_layers=len(container),
                n_heads=n_heads,
                d_head=int(d_head),
                layer=f"{layers}[{{i}}]",
                head_input=f"{layers}[{{i}}].{proj}",
                final_norm=norm if norm in names else None,
                unembed=unembed if unembed is not None and unembed in names else None,
                embed=embed,
            )
        raise UnknownArchitectureError(
            f"TransformerSpec.from_model does not recognise {type(model).__name__}: it knows Hugging Face GPT-2 "
            "(transformer.h[i].attn.c_proj) and Llama-style models (model.layers[i].self_attn.o_proj) with a "
            "`config`. Describe yours: TransformerSpec(n_layers, n_heads, d_head, layer='blocks[{i}]', "
            "head_input='blocks[{i}].attn.out_proj', final_norm='ln_f', unembed='lm_head', embed='embed')."
        )

    # -- paths ------------------------------------------------------------------------------------
    def layer_index(self, layer: int) -> int:
        """``layer`` as a non-negative index (negative indices count from the end).

        Raises:
            HeadIndexError: If it is not an int in ``[-n_layers, n_layers)``.
        """
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -self.n_layers <= layer < self.n_layers
        ):
            raise HeadIndexError(
                f"Layer {layer!r} is out of range: the model has {self.n_layers} layers (0 to {self.n_layers - 1}, "
                "or negative from the end)."
            )
        return layer % self.n_layers

    def layer_path(self, layer: int) -> str:
        """Path of layer ``layer`` (negative indices count from the end)."""
        return self.layer.format(i=self.layer_index(layer))

    def head_input_path(self, layer: int) -> str:
        """Path of the attention output projection of layer ``layer`` (its input holds the heads)."""
        return self.head_input.format(i=self.layer_index(layer))

    def layers(self, layers: Iterable[int] | None = None) -> list[int]:
        """``layers`` as sorted unique non-negative indices (all layers when None)."""
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, int):
            layers = [layers]
        return sorted({self.layer_index(i) for i in layers})

    def resolve(self, model: nn.Module, path: str | None, what: str) -> nn.Module:
        """The module at ``path``, with an error naming the spec field when it is missing."""
        if path is None:
            raise ModulePathError(
                f"This TransformerSpec has no {what} path; the model has none, or pass a spec naming it."
            )
        try:
            return resolve_path(model, path)
        except ModulePathError as err:
            raise ModulePathError(f"TransformerSpec {what} path {path!r}: {err}") from err


def normalize_heads(heads: Any, spec: TransformerSpec) -> dict[int, tuple[int, ...]]:
    """``[(layer, head), ...]`` as ``{layer: (head, ...)}`` with non-negative indices.

    Raises:
        HeadIndexError: For a malformed pair, or a layer or head out of range.
    """
    if isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(h, int) for h in heads):
        heads = [heads]
    pairs: Sequence[Any] = list(heads)
    if not pairs:
        raise HeadIndexError("No head given; pass (layer, head) pairs, e.g. [(0, 3), (1, 0)].")
    out: dict[int, set[int]] = {}
    for pair in pairs:
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        ):
            raise HeadIndexError(
                f"Heads are (layer, head) pairs of ints, got {pair!r}; e.g. [(0, 3), (1, 0)]."
            )
        layer, head = spec.layer_index(pair[0]), pair[1]
        if not -spec.n_heads <= head < spec.n_heads:
            raise HeadIndexError(
                f"Head {head} of layer {layer} is out of range: the model has {spec.n_heads} heads per layer "
                f"(0 to {spec.n_heads - 1})."
            )
        out.setdefault(layer, set()).add(head % spec.n_heads)
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(out.items())}
