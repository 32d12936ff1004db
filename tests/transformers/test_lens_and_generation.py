"""Logit lens, and steering / caching / patching through ``model.generate`` (greedy decoding)."""

from __future__ import annotations

import pytest
import torch
from conftest import gpt2, ids, llama
from tensordict import TensorDict

from tdhook.errors import InvalidInputError
from tdhook.latent import ActivationCaching, SteeringVectors
from tdhook.transformers import HeadAblation, HeadCaching, LogitLens, PromptPatch, TransformerSpec, logit_lens

HF = {"in_keys": {"input_ids": "input_ids"}, "out_keys": ["logits"]}


@pytest.mark.parametrize("build", [gpt2, llama])
def test_last_layer_lens_equals_the_logits(build) -> None:
    model, x = build(), ids()
    with torch.no_grad(), LogitLens().prepare(model, **HF) as hooked:
        logits = hooked(TensorDict(input_ids=x, batch_size=[2]))["logits"]
    lens = hooked.hooking_context.cache["lens"]
    assert sorted(lens.keys()) == ["0", "1"]
    torch.testing.assert_close(lens["1"], logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lens["0"], logits)


def test_lens_of_a_middle_layer_and_one_position() -> None:
    model, x = gpt2(), ids()
    with torch.no_grad(), ActivationCaching(r"transformer\.h\.\d+$").prepare(model, **HF) as hooked:
        hooked(TensorDict(input_ids=x, batch_size=[2]))
    resid = hooked.hooking_context.cache["transformer.h.0"]
    with torch.no_grad():
        expected = model.lm_head(model.transformer.ln_f(resid))
        torch.testing.assert_close(logit_lens(model, resid), expected)
        # composed with a cache of every module: the lens's own projection does not fire ln_f's hook
        composed = ActivationCaching(r"transformer\.ln_f$")
        with (
            LogitLens(0, position=-1).prepare(model, **HF) as hooked,
            composed.prepare(model, **HF) as cached,
        ):
            cached(TensorDict(input_ids=x, batch_size=[2]))
    torch.testing.assert_close(hooked.hooking_context.cache["lens", "0"], expected[:, -1:])
    final = model.transformer.ln_f(model.transformer.h[1](resid))
    torch.testing.assert_close(cached.hooking_context.cache["transformer.ln_f"], final, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="position must be an int"):
        LogitLens(position=0.5)


def _greedy(model, x, **kwargs):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs)


def test_steering_through_generate_equals_manual_hooks() -> None:
    model, x = gpt2(), ids(batch=2, length=4)
    v = 3.0 * torch.randn(32, generator=torch.Generator().manual_seed(4))
    plain = _greedy(model, x)
    with SteeringVectors(["transformer.h.0"], vectors={"transformer.h.0": v}).prepare(model, **HF):
        steered = _greedy(model, x)
    calls = []

    def manual(m, a, o):
        calls.append(o.shape[1])
        return o + v

    handle = model.transformer.h[0].register_forward_hook(manual)
    expected = _greedy(model, x)
    handle.remove()
    assert torch.equal(steered, expected)
    assert not torch.equal(steered, plain)
    assert calls == [4, 1, 1, 1, 1, 1]  # every step was steered: the prompt, then one token at a time


@pytest.mark.parametrize("build", [gpt2, llama])
def test_caching_accumulates_every_generation_step(build) -> None:
    model, x = build(), ids(batch=2, length=4)
    spec = TransformerSpec.from_model(model)
    block = spec.layer_path(1).replace("[", ".").replace("]", "")
    caching = ActivationCaching(rf"{block}$", accumulate=True, accumulate_dim=1)
    with (
        caching.prepare(model, **HF) as hooked,
        HeadCaching(accumulate=True, accumulate_dim=1).prepare(model, **HF) as heads,
    ):
        tokens = _greedy(model, x)
    cache = hooked.hooking_context.cache
    assert cache[block].shape == (2, 4 + 5, 32)  # the prompt, then one step per new token but the last
    with (
        torch.no_grad(),
        HeadCaching().prepare(model, **HF) as full_heads,
        ActivationCaching(rf"{block}$").prepare(model, **HF) as full,
    ):
        full(TensorDict(input_ids=tokens[:, :-1], batch_size=[2]))
    torch.testing.assert_close(cache[block], full.hooking_context.cache[block], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        heads.hooking_context.cache["heads", "1"],
        full_heads.hooking_context.cache["heads", "1"],
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_patching_through_generate(use_cache: bool) -> None:
    """Patching the embeddings and every layer on the prompt makes the corrupted prompt generate the clean tokens."""
    model = gpt2()
    clean, corrupted = ids(length=5, seed=1), ids(length=5, seed=2)
    keys = ["transformer.drop", "transformer.h.0", "transformer.h.1"]
    with torch.no_grad(), ActivationCaching("|".join(rf"{k}$" for k in keys)).prepare(model, **HF) as hooked:
        hooked(TensorDict(input_ids=clean, batch_size=[2]))
    patch = PromptPatch(hooked.hooking_context.cache)
    with SteeringVectors(keys, steer_fn=patch).prepare(model, **HF):
        patched = _greedy(model, corrupted, use_cache=use_cache)
    assert torch.equal(patched[:, 5:], _greedy(model, clean)[:, 5:])
    assert not torch.equal(patched[:, 5:], _greedy(model, corrupted)[:, 5:])
    # one layer only: the same tokens as manual hooks doing the same
    with SteeringVectors(["transformer.h.0"], steer_fn=patch).prepare(model, **HF):
        one = _greedy(model, corrupted, use_cache=use_cache)
    clean_h0 = hooked.hooking_context.cache["transformer.h.0"]

    def manual(m, a, o):
        if o.shape[1] < 5:
            return None
        o = o.clone()
        o[:, :5] = clean_h0
        return o

    handle = model.transformer.h[0].register_forward_hook(manual)
    expected = _greedy(model, corrupted, use_cache=use_cache)
    handle.remove()
    assert torch.equal(one, expected)


def test_head_ablation_through_generate() -> None:
    model, x = gpt2(), ids(batch=2, length=4)
    with HeadAblation([(0, h) for h in range(4)] + [(1, h) for h in range(4)]).prepare(model, **HF):
        ablated = _greedy(model, x)
    zeroed = gpt2()
    with torch.no_grad():
        for block in zeroed.transformer.h:
            block.attn.c_proj.weight.zero_()
    assert torch.equal(ablated, _greedy(zeroed, x))


def test_prompt_patch_refuses_one_token_prompts() -> None:
    with pytest.raises(InvalidInputError, match=r"prompt_len >= 2.*got \(2, 1, 32\)"):
        PromptPatch({"transformer.h.0": torch.zeros(2, 1, 32)})
