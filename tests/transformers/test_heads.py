"""Attention heads as targets (GPT-2 and Llama-style): caching, patching and ablation vs manual computations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import bert, gpt2, ids, llama
from tensordict import TensorDict
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tdhook.latent import ActivationPatching
from tdhook.transformers import (
    HeadAblation,
    HeadCaching,
    HeadIndexError,
    HeadPatching,
    InvalidAblationModeError,
    TransformerSpec,
    UnknownArchitectureError,
)

HF = {"in_keys": {"input_ids": "input_ids"}, "out_keys": ["logits"]}


def _capture(module: torch.nn.Module, run) -> torch.Tensor:
    saved = []
    handle = module.register_forward_hook(lambda m, a, o: saved.append(o))
    try:
        run()
    finally:
        handle.remove()
    return saved[0]


def _causal_attention(q, k, v, scale):  # (B, H, T, d) each
    scores = q @ k.transpose(-1, -2) * scale
    t = q.shape[-2]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, T, H, d)


def manual_gpt2_z(model, x, layer):
    """Per-head outputs written from the GPT-2 equations, from the layer's normalised input."""
    block = model.transformer.h[layer]
    h = _capture(block.ln_1, lambda: model(x))
    b, t, d = h.shape
    n = model.config.n_head
    q, k, v = block.attn.c_attn(h).split(d, dim=-1)
    q, k, v = (a.view(b, t, n, d // n).transpose(1, 2) for a in (q, k, v))
    return _causal_attention(q, k, v, 1 / math.sqrt(d // n))


def manual_llama_z(model, x, layer):
    """Per-head outputs with rotary embeddings and grouped-query attention (2 key-value heads, 4 heads)."""
    attn = model.model.layers[layer].self_attn
    h = _capture(model.model.layers[layer].input_layernorm, lambda: model(x))
    b, t, _ = h.shape
    n, n_kv, dh = model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim
    q = attn.q_proj(h).view(b, t, n, dh).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, n_kv, dh).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, n_kv, dh).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(t)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(n // n_kv, dim=1), v.repeat_interleave(n // n_kv, dim=1)
    return _causal_attention(q, k, v, dh**-0.5)


@pytest.mark.parametrize(("build", "manual"), [(gpt2, manual_gpt2_z), (llama, manual_llama_z)])
def test_head_caching_matches_manual_per_head_computation(build, manual) -> None:
    model, x = build(), ids()
    with torch.no_grad():
        with HeadCaching().prepare(model, **HF) as hooked:
            hooked(TensorDict(input_ids=x, batch_size=[2]))
        cache = hooked.hooking_context.cache
        for layer in range(2):
            z = cache["heads", str(layer)]
            assert z.shape == (2, 6, 4, 8)
            torch.testing.assert_close(z, manual(model, x, layer), rtol=1e-4, atol=1e-5)


def test_spec_recognises_families() -> None:
    spec = TransformerSpec.from_model(gpt2())
    assert (spec.n_layers, spec.n_heads, spec.d_head) == (2, 4, 8)
    assert spec.head_input_path(-1) == "transformer.h[1].attn.c_proj"
    assert (spec.final_norm, spec.unembed, spec.embed) == ("transformer.ln_f", "lm_head", "transformer.wte")
    spec = TransformerSpec.from_model(llama())
    assert spec.head_input_path(0) == "model.layers[0].self_attn.o_proj"
    assert TransformerSpec.from_model(llama().model).final_norm == "norm"
    with pytest.raises(UnknownArchitectureError, match=r"does not recognise BertModel.*TransformerSpec\("):
        TransformerSpec.from_model(bert())


def _zeroed_projection(model, layer: int, head: int) -> torch.nn.Module:
    """Oracle: ablating head h = zeroing the projection's weights that read it (independent of hooks)."""
    spec = TransformerSpec.from_model(model)
    proj = model.get_submodule(spec.head_input_path(layer).replace("[", ".").replace("]", ""))
    sl = slice(head * spec.d_head, (head + 1) * spec.d_head)
    with torch.no_grad():
        if type(proj).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
            proj.weight[sl, :] = 0
        else:  # nn.Linear: weight is (out, in)
            proj.weight[:, sl] = 0
    return model


@pytest.mark.parametrize("build", [gpt2, llama])
def test_zero_ablation_equals_zeroed_projection_weights(build) -> None:
    model, x = build(), ids()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), HeadAblation([(1, 2)]).prepare(model, **HF) as hooked:
        ablated = hooked(TensorDict(input_ids=x, batch_size=[2]))["logits"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        plain = model(x).logits
        expected = _zeroed_projection(build(), 1, 2)(x).logits
    torch.testing.assert_close(ablated, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ablated, plain)


@pytest.mark.parametrize(
    ("build", "projection"),
    [(gpt2, "transformer.h.0.attn.c_proj"), (llama, "model.layers.0.self_attn.o_proj")],
)
def test_mean_ablation_matches_a_manual_pre_hook(build, projection: str) -> None:
    model, x = build(), ids(batch=4)
    with torch.no_grad(), HeadAblation([(0, 1), (0, 3)], mode="mean").prepare(model, **HF) as hooked:
        ablated = hooked(TensorDict(input_ids=x, batch_size=[4]))["logits"]

    def manual(m, args):
        z = args[0].view(4, 6, 4, 8).clone()
        z[:, :, [1, 3]] = z[:, :, [1, 3]].mean(0, keepdim=True)
        return (z.view(4, 6, 32),)

    handle = model.get_submodule(projection).register_forward_pre_hook(manual)
    with torch.no_grad():
        expected = model(x).logits
    handle.remove()
    with torch.no_grad():
        plain = model(x).logits
    torch.testing.assert_close(ablated, expected, rtol=0, atol=0)
    assert not torch.allclose(ablated, plain)


@pytest.mark.parametrize("build", [gpt2, llama])
def test_head_patching_matches_a_manual_pre_hook(build) -> None:
    model = build()
    clean, corrupted = ids(seed=1), ids(seed=2)
    td = TensorDict({"input_ids": clean, ("patched", "input_ids"): corrupted}, batch_size=[2])
    with torch.no_grad(), HeadPatching([(0, 1), (1, 3)]).prepare(model, **HF) as hooked:
        td = hooked(td)
    spec = TransformerSpec.from_model(model)
    projs = [
        model.get_submodule(spec.head_input_path(i).replace("[", ".").replace("]", "")) for i in range(2)
    ]
    saved = {}
    handles = [
        p.register_forward_pre_hook(lambda m, a, i=i: saved.__setitem__(i, a[0])) for i, p in enumerate(projs)
    ]
    with torch.no_grad():
        clean_logits = model(clean).logits
    for h in handles:
        h.remove()

    def patch(m, args, layer, head):
        z = args[0].view(2, 6, 4, 8).clone()
        z[:, :, head] = saved[layer].view(2, 6, 4, 8)[:, :, head]
        return (z.view(2, 6, 32),)

    handles = [projs[0].register_forward_pre_hook(lambda m, a: patch(m, a, 0, 1))]
    handles.append(projs[1].register_forward_pre_hook(lambda m, a: patch(m, a, 1, 3)))
    with torch.no_grad():
        expected = model(corrupted).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(td["logits"], clean_logits)
    torch.testing.assert_close(td["patched", "logits"], expected, rtol=0, atol=0)
    assert not any(p._forward_pre_hooks for p in projs)


def test_patching_every_head_equals_patching_the_projection() -> None:
    model = gpt2()
    td = TensorDict({"input_ids": ids(seed=1), ("patched", "input_ids"): ids(seed=2)}, batch_size=[2])
    with torch.no_grad(), HeadPatching([(0, h) for h in range(4)]).prepare(model, **HF) as hooked:
        heads = hooked(td.clone())["patched", "logits"]
    with torch.no_grad(), ActivationPatching(["transformer.h.0.attn.c_proj"]).prepare(model, **HF) as hooked:
        whole = hooked(td.clone())["patched", "logits"]
    torch.testing.assert_close(heads, whole, rtol=1e-5, atol=1e-6)


def test_bad_heads_are_refused_before_any_hook() -> None:
    model = gpt2()
    proj = model.transformer.h[0].attn.c_proj
    with pytest.raises(HeadIndexError, match=r"Head 4 of layer 0 is out of range: the model has 4 heads"):
        HeadAblation([(0, 1), (0, 4)]).prepare(model, **HF).__enter__()
    with pytest.raises(HeadIndexError, match=r"Layer 2 is out of range: the model has 2 layers"):
        HeadPatching([(2, 0)]).prepare(model, **HF).__enter__()
    with pytest.raises(HeadIndexError, match=r"\(layer, head\) pairs of ints, got 'a'"):
        HeadAblation(["a"]).prepare(model, **HF).__enter__()
    with pytest.raises(InvalidAblationModeError, match=r"Unknown ablation mode 'max'"):
        HeadAblation([(0, 0)], mode="max")
    assert not proj._forward_pre_hooks


def test_hooks_removed_after_an_exception() -> None:
    model, x = gpt2(), ids()
    projs = [model.transformer.h[i].attn.c_proj for i in range(2)]

    def body() -> None:
        with HeadAblation([(0, 0), (1, 1)]).prepare(model, **HF) as hooked:
            hooked(TensorDict(input_ids=x, batch_size=[2]))
            assert all(p._forward_pre_hooks for p in projs)
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        body()
    assert not any(p._forward_pre_hooks for p in projs)
