"""Attribution patching vs activation patching of every site, one at a time, at GPT-2-small shape.

Sites: the residual stream after each of the 12 layers at each position (12 × T) and each of the
144 heads' outputs (all positions). ``tdhook`` runs ``AttributionPatching`` (clean run, corrupted
run, one backward). ``patching`` is the exact method it approximates, written with raw torch
hooks (the fastest way to do it): one clean run that records every site, then one corrupted
forward per site with the clean activation patched in. Both under the same random-init GPT-2
small, on random token ids with the corrupted prompt differing in one token.

The gate compares what both compute identically, the metric on the clean and the corrupted
runs; how well the estimates track the real effects is tested in
``tests/transformers/test_attribution_patching.py`` (correlation > 0.99 on heads).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._harness import Case, Impl, Task

VOCAB = 50257
A, B = 11, 22


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, A] - logits[:, -1, B]


def build(params: Any) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    from ..models import gpt2_small

    overrides = {k: params[k] for k in ("n_layer", "n_embd", "n_head") if k in params}
    model = gpt2_small(**overrides)
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (params["batch"], params["seq"]), generator=gen)
    corrupted = clean.clone()
    corrupted[:, params["seq"] // 2] = (corrupted[:, params["seq"] // 2] + 1) % VOCAB
    return model, clean, corrupted


class Tdhook(Impl):
    """``AttributionPatching(metric)``: every layer x position and every head in one call."""

    name = "tdhook"
    label = "tdhook AttributionPatching"

    def setup(self, params):
        from tensordict import TensorDict

        from tdhook.transformers import AttributionPatching

        model, clean, corrupted = build(params)
        self.td = TensorDict(
            {"input_ids": clean, ("patched", "input_ids"): corrupted}, batch_size=[len(clean)]
        )
        self.context = AttributionPatching(metric).prepare(
            model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]
        )

    def run(self):
        with self.context as hooked:
            self.out = hooked(self.td.clone())

    def output(self):
        attr = self.out["attr_patching"]
        return {"clean_metric": attr["clean_metric"], "corrupted_metric": attr["corrupted_metric"]}


def _record(store: dict, key: Any, module: Any, args: Any, output: Any = None) -> None:
    store[key] = args[0] if output is None else output


def _patch_position(
    value: torch.Tensor, pos: int, module: Any, args: Any, output: torch.Tensor
) -> torch.Tensor:
    new = output.clone()
    new[:, pos] = value[:, pos]
    return new


def _patch_head(value: torch.Tensor, sl: slice, module: Any, args: Any) -> tuple[torch.Tensor]:
    new = args[0].clone()
    new[..., sl] = value[..., sl]
    return (new,)


class Patching(Impl):
    """Activation patching with raw hooks: a clean recording run, then one corrupted forward per site."""

    name = "patching"
    label = "activation patching, every site (raw hooks)"

    def setup(self, params):
        self.model, self.clean, self.corrupted = build(params)
        config = self.model.config
        self.blocks = list(self.model.transformer.h)
        self.projs = [b.attn.c_proj for b in self.blocks]
        self.n_heads, self.d_head = config.n_head, config.n_embd // config.n_head

    def run(self):
        model, store = self.model, {}
        handles = [
            b.register_forward_hook(functools.partial(_record, store, ("resid", i)))
            for i, b in enumerate(self.blocks)
        ]
        handles += [
            p.register_forward_pre_hook(functools.partial(_record, store, ("z", i)))
            for i, p in enumerate(self.projs)
        ]
        with torch.no_grad():
            clean_metric = metric(model(self.clean).logits)
            for h in handles:
                h.remove()
            corrupted_metric = metric(model(self.corrupted).logits)
            effects = []
            for i, block in enumerate(self.blocks):
                for pos in range(self.clean.shape[1]):
                    hook = functools.partial(_patch_position, store["resid", i], pos)
                    handle = block.register_forward_hook(hook)
                    effects.append(metric(model(self.corrupted).logits) - corrupted_metric)
                    handle.remove()
            for i, proj in enumerate(self.projs):
                for h in range(self.n_heads):
                    hook = functools.partial(
                        _patch_head, store["z", i], slice(h * self.d_head, (h + 1) * self.d_head)
                    )
                    handle = proj.register_forward_pre_hook(hook)
                    effects.append(metric(model(self.corrupted).logits) - corrupted_metric)
                    handle.remove()
        self.result = {"clean_metric": clean_metric, "corrupted_metric": corrupted_metric}
        self.effects = torch.stack(effects, dim=1)

    def output(self):
        return self.result


TASK = Task(
    name="attribution_patching_gpt2",
    title="Attribution patching vs activation patching of every site (12 x T residual, 144 heads), GPT-2 small",
    env="dev",
    impls=[Tdhook, Patching],
    cases=[
        Case(
            "gpt2-small (1,8)",
            {"batch": 1, "seq": 8},
            smoke={"batch": 1, "seq": 4, "n_layer": 2, "n_embd": 32, "n_head": 4},
        ),
    ],
    rtol=1e-4,
    atol=1e-4,
    targets={"patching": 0.1},
    timing={"warmup": 1, "min_repeats": 3, "max_repeats": 5, "budget_s": 5.0},
    memory=False,
)
