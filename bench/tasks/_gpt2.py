"""GPT-2-small activation caching, shared by ``caching_gpt2`` (vs nnsight) and ``caching_gpt2_tl``.

Every library caches the 12 block outputs (scope ``blocks``) or every submodule's output (scope
``all``) of the same randomly initialised GPT-2 small (eager attention, as TransformerLens
forces it) on random token ids, under ``torch.no_grad()``, setting its hooks up per call. The
gate compares the 12 block outputs and the logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._harness import Case, Impl, Skip

N_LAYERS = 12
VOCAB = 50257
BLOCK_PATTERN = r"transformer\.h\.\d+$"


def build(params: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    from ..models import gpt2_small

    overrides = {k: params[k] for k in ("n_layer", "n_embd", "n_head") if k in params}
    model = gpt2_small(attn_implementation="eager", **overrides)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (params["batch"], params["seq"]), generator=gen)
    return model, ids


def first(output: Any, **_: Any) -> Any:
    """The tensor of a module's output (the first element of tuples and HF model outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def block_names(n_layer: int = N_LAYERS) -> list[str]:
    return [f"transformer.h.{i}" for i in range(n_layer)]


def execution_order(model: torch.nn.Module, ids: torch.Tensor) -> list[str]:
    """Names of the submodules whose forward completes, in completion order (one raw-hook pass)."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(functools.partial(_record, order, name))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return order


def _record(order: list[str], name: str, module: Any, args: Any, output: Any) -> None:
    order.append(name)


def _store(store: dict, keep: Any, key: str, module: Any, args: Any, output: Any) -> None:
    store[key] = keep(output)


def all_modules(params: Any) -> bool:
    """Scope ``all`` (every submodule) rather than ``blocks`` (the 12 block outputs)."""
    return params["scope"] == "all"


class Tdhook(Impl):
    """``ActivationCaching(pattern, callback=first)``, entered and left around every call.

    Subclasses change what is cached and how (``callback``: None for the default nesting rule,
    ``out_key``: the model output's key) and what the gate reads (``output``).
    """

    name = "tdhook"
    label = "tdhook ActivationCaching"
    callback: Any = staticmethod(first)
    out_key = "output"

    def setup(self, params):
        from tensordict import TensorDict

        from tdhook.latent import ActivationCaching

        model, self.ids = build(params)
        self.n_layer = params.get("n_layer", N_LAYERS)
        pattern = r".+" if all_modules(params) else BLOCK_PATTERN
        options = {} if self.callback is None else {"callback": self.callback}
        self.context = ActivationCaching(pattern, **options).prepare(
            model, in_keys={"input_ids": "input_ids"}, out_keys=[self.out_key]
        )
        self.td_class = TensorDict

    def run(self):
        ids = self.ids
        with torch.no_grad(), self.context as hooked:
            self.td = hooked(self.td_class(input_ids=ids, batch_size=ids.shape[:1]))

    def output(self):
        cache = self.context.cache
        return {**{n: cache[n] for n in block_names(self.n_layer)}, "logits": self.td["output", "logits"]}


class Raw(Impl):
    """``register_forward_hook`` on every module to cache, forward, ``remove()``.

    ``keep`` is what a hook stores of a module's output (its first tensor here; subclasses may
    keep the raw output).
    """

    name = "raw"
    label = "raw torch hooks"
    keep: Any = staticmethod(first)

    def setup(self, params):
        self.model, self.ids = build(params)
        self.n_layer = params.get("n_layer", N_LAYERS)
        named = dict(self.model.named_modules())
        names = [n for n in named if n] if all_modules(params) else block_names(self.n_layer)
        self.modules = [(n, named[n]) for n in names]

    def run(self):
        store: dict[str, Any] = {}
        handles = [
            m.register_forward_hook(functools.partial(_store, store, self.keep, n)) for n, m in self.modules
        ]
        try:
            with torch.no_grad():
                self.logits = self.model(self.ids).logits
        finally:
            for h in handles:
                h.remove()
        self.store = store

    def output(self):
        return {**{n: self.store[n] for n in block_names(self.n_layer)}, "logits": self.logits}


class Nnsight(Impl):
    """``with model.trace(ids): <module>.output.save()`` for every module to cache, in execution order."""

    name = "nnsight"
    label = "nnsight"

    def setup(self, params):
        from nnsight import NNsight

        model, self.ids = build(params)
        self.n_layer = params.get("n_layer", N_LAYERS)
        names = block_names(self.n_layer) if params["scope"] == "blocks" else execution_order(model, self.ids)
        self.names = names
        self.model = NNsight(model)
        envoys = {}
        for name in names:
            envoy = self.model
            for part in name.split("."):
                envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
            envoys[name] = envoy
        self.envoys = [envoys[n] for n in names]

    def run(self):
        saved = []
        with torch.no_grad(), self.model.trace(self.ids):
            for envoy in self.envoys:
                saved.append(envoy.output.save())
            logits = self.model.output.save()
        self.saved = dict(zip(self.names, saved))
        self.logits = logits

    def output(self):
        return {**{n: first(self.saved[n]) for n in block_names(self.n_layer)}, "logits": first(self.logits)}


class TransformerLens(Impl):
    """TransformerLens 4 ``TransformerBridge`` around the same model; ``run_with_cache``.

    Scope ``blocks`` filters on ``blocks.{i}.hook_resid_post``; scope ``all`` caches every hook
    point (TransformerLens's own notion of "everything").
    """

    name = "transformer_lens"
    label = "TransformerLens"

    def setup(self, params):
        from tokenizers import Tokenizer, models
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import PreTrainedTokenizerFast

        model, self.ids = build(params)
        self.n_layer = params.get("n_layer", N_LAYERS)
        # An offline stand-in tokenizer (the benchmark feeds token ids; nothing is downloaded).
        vocab = {f"t{i}": i for i in range(VOCAB)}
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
            unk_token="t0",
            eos_token=f"t{VOCAB - 1}",
            bos_token=f"t{VOCAB - 1}",
            pad_token=f"t{VOCAB - 1}",
            add_bos_token=True,
            name_or_path="offline-gpt2",
        )
        self.bridge = TransformerBridge.boot_transformers("gpt2", hf_model=model, tokenizer=tokenizer)
        self.wanted = [f"blocks.{i}.hook_resid_post" for i in range(self.n_layer)]
        wanted = frozenset(self.wanted)
        self.names_filter = wanted.__contains__ if params["scope"] == "blocks" else None

    def run(self):
        with torch.no_grad():
            self.logits, self.cache = self.bridge.run_with_cache(self.ids, names_filter=self.names_filter)

    def output(self):
        return {
            **{b: self.cache[w] for b, w in zip(block_names(self.n_layer), self.wanted)},
            "logits": self.logits,
        }


#: A two-layer GPT-2 on four tokens: the CI smoke test's size (gate only, raw hooks as the peer).
SMOKE = {"batch": 1, "seq": 4, "n_layer": 2, "n_embd": 32, "n_head": 4}
CASES = [
    Case("blocks (1,64)", {"batch": 1, "seq": 64, "scope": "blocks"}, smoke={**SMOKE, "scope": "blocks"}),
    Case("blocks (4,256)", {"batch": 4, "seq": 256, "scope": "blocks"}),
    Case("all modules (1,64)", {"batch": 1, "seq": 64, "scope": "all"}, smoke={**SMOKE, "scope": "all"}),
]

__all__ = ["CASES", "SMOKE", "Nnsight", "Raw", "Skip", "Tdhook", "TransformerLens"]
