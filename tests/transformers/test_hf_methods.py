"""Every method on tiny Hugging Face models: caching ".*", patching, steering, IG and LRP, probing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import bert, gpt2, ids, llama, vit
from tensordict import TensorDict

from tdhook.attribution import IntegratedGradients
from tdhook.latent import ActivationCaching, ActivationPatching, SteeringVectors


def _manual_outputs(model: torch.nn.Module, **inputs: Any) -> dict[str, Any]:
    """Every module's output; a module run twice (ViT's dropout) gives ``name`` then ``name#1``."""
    outputs: dict[str, Any] = {}
    calls: dict[str, int] = {}

    def record(name: str, output: Any) -> None:
        k = calls.get(name, 0)
        calls[name] = k + 1
        outputs[name if k == 0 else f"{name}#{k}"] = output

    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: record(name, o))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _expected_leaves(value: Any, prefix: tuple[str, ...]) -> dict[tuple[str, ...], torch.Tensor]:
    """The leaves the documented rule stores, written out independently of the library."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, tuple) and len(value) == 1 and not prefix[1:]:
        return _expected_leaves(value[0], prefix)  # a one-element output is unwrapped
    if isinstance(value, (tuple, list)):
        pairs = [(str(i), v) for i, v in enumerate(value)]
    elif isinstance(value, dict):  # ModelOutput is an OrderedDict
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        return {}
    leaves = {}
    for name, item in pairs:
        leaves.update(_expected_leaves(item, (*prefix, name)))
    return leaves


CASES = {
    "gpt2": (gpt2, {"input_ids": "input_ids"}, ["logits"], lambda: {"input_ids": ids()}),
    "llama": (llama, {"input_ids": "input_ids"}, ["logits"], lambda: {"input_ids": ids()}),
    "bert": (bert, {"input_ids": "input_ids"}, ["last_hidden_state"], lambda: {"input_ids": ids()}),
    "vit": (
        vit,
        {"pixel_values": "pixel_values"},
        ["last_hidden_state"],
        lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))},
    ),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_cache_every_module(family: str) -> None:
    build, in_keys, out_keys, make_inputs = CASES[family]
    model, inputs = build(), make_inputs()
    expected: dict[tuple[str, ...], torch.Tensor] = {}
    for name, output in _manual_outputs(model, **inputs).items():
        expected.update(_expected_leaves(output, (name,)))
    with (
        torch.no_grad(),
        ActivationCaching(".*").prepare(model, in_keys=in_keys, out_keys=out_keys) as hooked,
    ):
        hooked(TensorDict(inputs, batch_size=[2]))
    cache = hooked.hooking_context.cache
    stored = {k if isinstance(k, tuple) else (k,): v for k, v in cache.items(True, True)}
    assert set(stored) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(stored[key], value, rtol=0, atol=0)
    # the attention modules return tuples with None entries: stored as ("…attn", "0"), None left out
    attention = {k for k in stored if "attn" in k[0] or "attention" in k[0]}
    assert attention
    assert any(k[-1] == "0" for k in attention)
    assert not any(k[0] == "" for k in stored)


def test_cache_model_output_and_no_tensor_module() -> None:
    model = gpt2()
    x = ids()
    with (
        torch.no_grad(),
        ActivationCaching(r"transformer$").prepare(model, in_keys={"input_ids": "input_ids"}) as h,
    ):
        h(TensorDict(input_ids=x, batch_size=[2]))
    cache = h.hooking_context.cache
    # a BaseModelOutputWithPast: its tensor field nested by name, the DynamicCache object left out
    assert list(cache["transformer"].keys()) == ["last_hidden_state"]
    torch.testing.assert_close(
        cache["transformer", "last_hidden_state"], model.transformer(x).last_hidden_state
    )


def _prompts(tokenizer) -> TensorDict:
    clean = tokenizer("the cat sat on the mat", "the dog sat on a rug")
    corrupted = tokenizer("the dog sat on the mat", "the cat sat on a rug")
    return TensorDict({"input_ids": clean, ("patched", "input_ids"): corrupted}, batch_size=[2])


@pytest.mark.parametrize(("build", "layer"), [(gpt2, "transformer.h[1]"), (llama, "model.layers[1]")])
def test_patching_a_whole_layer_restores_clean_logits(build, layer, tokenizer) -> None:
    model = build()
    td = _prompts(tokenizer)
    with (
        torch.no_grad(),
        ActivationPatching([layer]).prepare(
            model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]
        ) as hooked,
    ):
        td = hooked(td)
    with torch.no_grad():
        clean = model(td["input_ids"]).logits
        corrupted = model(td["patched", "input_ids"]).logits
    torch.testing.assert_close(td["logits"], clean)
    torch.testing.assert_close(td["patched", "logits"], clean)  # the last layer carries everything
    assert not torch.allclose(corrupted, clean)


def test_patching_one_position_of_a_tuple_output(tokenizer) -> None:
    """Patch the attention output (a tuple) at the last position only; oracle: manual hooks."""
    model = gpt2()
    td = _prompts(tokenizer)

    def last_position(module_key, output, output_to_patch):
        out = output[0].clone()
        out[:, -1] = output_to_patch[0][:, -1]
        return (out, *output[1:])

    with (
        torch.no_grad(),
        ActivationPatching(["transformer.h.0.attn"], patch_fn=last_position).prepare(
            model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]
        ) as hooked,
    ):
        td = hooked(td)
    attn = model.transformer.h[0].attn
    saved = {}
    handle = attn.register_forward_hook(lambda m, a, o: saved.__setitem__("clean", o[0]))
    with torch.no_grad():
        model(td["input_ids"])
    handle.remove()

    def manual(m, a, o):
        out = o[0].clone()
        out[:, -1] = saved["clean"][:, -1]
        return (out, *o[1:])

    handle = attn.register_forward_hook(manual)
    with torch.no_grad():
        expected = model(td["patched", "input_ids"]).logits
    handle.remove()
    torch.testing.assert_close(td["patched", "logits"], expected, rtol=0, atol=0)
    assert not attn._forward_hooks


@pytest.mark.parametrize(("build", "layer"), [(gpt2, "transformer.h.0"), (llama, "model.layers.0")])
def test_steering_equals_a_manual_forward_hook(build, layer) -> None:
    model = build()
    x = ids()
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with (
        torch.no_grad(),
        SteeringVectors([layer], vectors={layer: v}, scale=2.0).prepare(
            model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]
        ) as hooked,
    ):
        steered = hooked(TensorDict(input_ids=x, batch_size=[2]))["logits"]
    module = model.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, a, o: o + 2.0 * v)
    with torch.no_grad():
        expected = model(x).logits
    handle.remove()
    torch.testing.assert_close(steered, expected, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, expected)


ENCODERS = {
    "bert": (bert, "encoder.layer.0", "input_ids", lambda seed: ids(seed=seed)),
    "vit": (
        vit,
        "layers.0",
        "pixel_values",
        lambda seed: torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),
    ),
}


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_patching_and_steering_an_encoder_layer(family: str) -> None:
    """BERT and ViT: patching a layer between two inputs and steering it equal hand-written hooks."""
    build, layer, key, make_input = ENCODERS[family]
    model = build()
    clean, corrupted = make_input(1), make_input(2)
    io = {"in_keys": {key: key}, "out_keys": ["last_hidden_state"]}
    td = TensorDict({key: clean, ("patched", key): corrupted}, batch_size=[2])
    with torch.no_grad(), ActivationPatching([layer]).prepare(model, **io) as hooked:
        td = hooked(td)
    module = model.get_submodule(layer)
    saved = {}
    handle = module.register_forward_hook(lambda m, a, o: saved.__setitem__("clean", o))
    with torch.no_grad():
        model(**{key: clean})
    handle.remove()
    handle = module.register_forward_hook(lambda m, a, o: saved["clean"])
    with torch.no_grad():
        expected = model(**{key: corrupted}).last_hidden_state
    handle.remove()
    torch.testing.assert_close(td["patched", "last_hidden_state"], expected, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(model(**{key: corrupted}).last_hidden_state, expected)

    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), SteeringVectors([layer], vectors={layer: v}).prepare(model, **io) as hooked:
        steered = hooked(TensorDict({key: clean}, batch_size=[2]))["last_hidden_state"]
    handle = module.register_forward_hook(lambda m, a, o: o + v)
    with torch.no_grad():
        expected = model(**{key: clean}).last_hidden_state
    handle.remove()
    torch.testing.assert_close(steered, expected, rtol=0, atol=0)
    assert not module._forward_hooks


def test_integrated_gradients_on_token_embeddings() -> None:
    """Layer IG on the token embedding, oracle: a hand-written Riemann IG through `inputs_embeds`."""
    model = gpt2()
    x = ids(batch=1, length=5)
    target = 7
    td = TensorDict(input_ids=x, batch_size=[1])
    td["baseline", "input_ids"] = torch.zeros_like(x)
    method = IntegratedGradients(
        use_inputs=False,
        input_modules=["transformer.wte"],
        method="riemann_right",
        n_steps=16,
        targets=[target],
        multiply_by_inputs=True,
    )
    with method.prepare(model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]) as hooked:
        td = hooked(td)
    attr = td["attr", "transformer.wte"]
    emb, base = model.transformer.wte(x).detach(), model.transformer.wte(torch.zeros_like(x)).detach()
    grads = torch.zeros_like(emb)
    for k in range(1, 17):
        point = (base + k / 16 * (emb - base)).requires_grad_(True)
        model(inputs_embeds=point).logits[..., target].sum().backward()
        grads += point.grad / 16
    torch.testing.assert_close(attr, grads * (emb - base), rtol=1e-4, atol=1e-6)
    assert attr.shape == (1, 5, 32)


def test_lrp_on_token_embeddings() -> None:
    """LRP relevance at the token embedding; oracle: the rules' backward written by hand.

    The ε-rule on the bias-free ``lm_head`` with the relevance seeded at the target logit ``z_t``
    gives its input the relevance ``x ⊙ W_t`` (``x ⊙ Wᵀ (R / z)`` with ``R = z``); every other
    module has no rule, so that relevance flows back to the embedding as a vector-Jacobian
    product through ``inputs_embeds``.
    """
    from tdhook.attribution import LRP
    from tdhook.attribution.lrp import EpsilonRule

    model, x, target = gpt2(), ids(batch=2, length=5), 7
    ruled = []

    def rules(name: str, module: torch.nn.Module) -> EpsilonRule | None:
        if name.endswith("lm_head"):
            ruled.append(name)
            return EpsilonRule(epsilon=1e-9)
        return None

    lrp = LRP(
        use_inputs=False,
        input_modules=["transformer.wte"],
        rule_mapper=rules,
        targets=[target],
        init_relevance="outputs",
        warn_on_missing_rule=False,
    )
    with lrp.prepare(model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]) as hooked:
        td = hooked(TensorDict(input_ids=x, batch_size=[2]))
    relevance = td["attr", "transformer.wte"]
    assert ruled == ["module.lm_head"]
    embeddings = model.transformer.wte(x).detach().requires_grad_(True)
    final = model(inputs_embeds=embeddings, output_hidden_states=True).hidden_states[-1]  # after ln_f
    at_lm_head = (final * model.lm_head.weight[target]).detach()
    (expected,) = torch.autograd.grad(final, embeddings, grad_outputs=at_lm_head)
    assert relevance.shape == (2, 5, 32)
    torch.testing.assert_close(relevance, expected, rtol=1e-4, atol=1e-6)
    assert relevance.abs().max() > 1e-2
    assert not model.lm_head._forward_hooks
    assert not model.transformer.wte._forward_hooks


def test_probing_the_residual_stream() -> None:
    """A linear probe on the last position's residual stream reads a feature of its token (held out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    from tdhook.latent.probing import ProbeManager, Probing

    model = gpt2()
    x = ids(batch=384, length=4, seed=5)
    # a linear feature of the current token's embedding: the residual stream carries it on
    u = torch.randn(32, generator=torch.Generator().manual_seed(6))
    score = model.transformer.wte.weight.detach() @ u
    labels = (score[x[:, -1]] > score.median()).long()
    manager = ProbeManager(
        LogisticRegression,
        {"C": 100.0, "max_iter": 2000},
        lambda preds, y: {"accuracy": accuracy_score(y, preds)},
        data_preprocess_callback=lambda data: data[:, -1].detach(),
    )
    probing = Probing(r"transformer\.h\.\d+$", manager.probe_factory, additional_keys=["labels", "step_type"])
    with (
        torch.no_grad(),
        probing.prepare(model, in_keys={"input_ids": "input_ids"}, out_keys=["logits"]) as hooked,
    ):
        hooked(TensorDict(input_ids=x[:256], labels=labels[:256], step_type="fit", batch_size=[256]))
        hooked(TensorDict(input_ids=x[256:], labels=labels[256:], step_type="predict", batch_size=[128]))
    assert set(manager.predict_metrics) == {"transformer.h.0_fwd", "transformer.h.1_fwd"}
    assert all(m["accuracy"] > 0.9 for m in manager.predict_metrics.values()), manager.predict_metrics
