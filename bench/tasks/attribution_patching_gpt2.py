"""Attribution patching vs activation patching of every site, one at a time, at GPT-2-small shape.

Sites: the residual stream after each of the 12 layers at each position (12 × T) and each of the
144 heads' outputs (all positions): 240 sites at T = 8. ``tdhook`` runs ``AttributionPatching``
(clean run, corrupted run, one backward). ``patching`` is the exact method it approximates,
written with raw torch hooks: one clean run that records every site, one corrupted run, then one
corrupted forward per site with that site's cached clean activation patched in (242 forwards).
Both under the same random-init GPT-2 small (:func:`bench.tasks._gpt2.build`), on random token
ids with the corrupted prompt differing in one token.

One GPT-2-small forward takes 0.3-0.9 s on the 2-core machine, so one full baseline call takes
1.2-3.6 min, and the harness makes five (gate, warm-up, three repeats): the child's 15 min limit
ran out under load. The timed baseline call therefore patches ``sites`` sites spread evenly over
the 240 (every forward costs the same: one full forward with one hook) and its times are
extrapolated to all 240, by ``(2 + 240) / (2 + sites)``; the report marks them. ``sites: None``
patches all of them.

The gate compares what both compute identically, the metric on the clean and the corrupted
runs; how well the estimates track the real effects is tested in
``tests/transformers/test_attribution_patching.py`` (correlation > 0.99 on heads).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .._harness import Case, Impl, Task
from ._gpt2 import VOCAB
from ._gpt2 import build as build_gpt2

A, B = 11, 22
#: Sites the timed baseline call patches (evenly spread over all of them), the rest extrapolated.
MEASURED_SITES = 24


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, A] - logits[:, -1, B]


def build(params: Any) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The shared GPT-2 (``_gpt2.build``) and its ids as the clean prompt; the corrupted one changes one token."""
    model, clean = build_gpt2(params)
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


def spread(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them for None or ``k >= n``)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


class Patching(Impl):
    """Activation patching with raw hooks: a clean recording run, then one corrupted forward per site."""

    name = "patching"
    label = "activation patching, every site (raw hooks)"

    def setup(self, params):
        self.model, self.clean, self.corrupted = build(params)
        config = self.model.config
        self.blocks = list(self.model.transformer.h)
        self.projs = [b.attn.c_proj for b in self.blocks]
        n_heads, d_head = config.n_head, config.n_embd // config.n_head
        # every site: (module, "resid" or "z", layer, hook factory argument)
        sites: list[tuple[str, int, Any]] = [
            ("resid", i, pos) for i in range(len(self.blocks)) for pos in range(self.clean.shape[1])
        ]
        sites += [
            ("z", i, slice(h * d_head, (h + 1) * d_head))
            for i in range(len(self.blocks))
            for h in range(n_heads)
        ]
        self.n_sites = len(sites)
        self.sites = [sites[i] for i in spread(len(sites), params.get("sites", MEASURED_SITES))]
        self.extrapolate = (2 + self.n_sites) / (2 + len(self.sites))

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
            for kind, layer, where in self.sites:
                if kind == "resid":
                    hook = functools.partial(_patch_position, store["resid", layer], where)
                    handle = self.blocks[layer].register_forward_hook(hook)
                else:
                    hook = functools.partial(_patch_head, store["z", layer], where)
                    handle = self.projs[layer].register_forward_pre_hook(hook)
                try:
                    effects.append(metric(model(self.corrupted).logits) - corrupted_metric)
                finally:
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
            smoke={"batch": 1, "seq": 4, "n_layer": 2, "n_embd": 32, "n_head": 4, "sites": None},
        ),
    ],
    rtol=1e-4,
    atol=1e-4,
    targets={"patching": 0.1},
    timing={"warmup": 1, "min_repeats": 3, "max_repeats": 5, "budget_s": 5.0},
    memory=False,
    notes=(
        f"The baseline patches {MEASURED_SITES} of the 240 sites (spread evenly) per timed call and its times are "
        "extrapolated to all 240 (every site costs one identical forward); `python -m bench.tasks."
        "attribution_patching_gpt2` times the full 242-forward call once against the extrapolation."
    ),
)


def check_extrapolation(params: Any | None = None) -> dict[str, float]:
    """Time one full baseline call (all sites) and one measured-part call in this process.

    Returns the full call's wall time, the extrapolated one and their ratio (1 when the linear
    extrapolation holds).
    """
    import time

    from .._harness import pin

    pin()
    params = {"batch": 1, "seq": 8, **(params or {})}
    part, full = Patching(), Patching()
    part.setup(params)
    full.setup({**params, "sites": None})
    part.run()  # warm-up
    t0 = time.perf_counter()
    part.run()
    extrapolated = (time.perf_counter() - t0) * part.extrapolate
    t0 = time.perf_counter()
    full.run()
    measured = time.perf_counter() - t0
    return {"full_s": measured, "extrapolated_s": extrapolated, "ratio": extrapolated / measured}


if __name__ == "__main__":
    print(check_extrapolation())
