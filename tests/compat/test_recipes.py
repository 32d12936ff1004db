"""The code recipes the 0.1 reference quotes run as written, with their values checked.

Steering (spec §8.3 "Notebook recipe"), caching GPT-2 MLPs (§8.1), the linear- and
bilinear-probing notebooks (§11.2) on tiny Hugging Face models built in code, and probing and
caching a TorchRL ``ClipPPOLoss`` with ``relative=False`` (the seed tutorial's names). Every
value is compared with hand-written torch hooks or scikit-learn on the same activations.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import accuracy_score, r2_score
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from tdhook.latent import ActivationAddition, ActivationCaching, SteeringVectors
from tdhook.latent.probing import (
    BilinearProbeManager,
    LowRankBilinearEstimator,
    ProbeManager,
    Probing,
)

transformers.logging.set_verbosity_error()


def tiny_gpt2(n_layer: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=n_layer, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def record(model: nn.Module, names: list[str], fn) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules during ``fn()``, with plain torch hooks."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
        for n in names
    ]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return seen


# -- steering (§8.3) ---------------------------------------------------------------------------


def test_steering_notebook_recipe() -> None:
    gpt2 = tiny_gpt2(8)
    g = torch.Generator().manual_seed(1)
    pos_ids, neg_ids, base_ids = (torch.randint(0, 50, (1, 6), generator=g) for _ in range(3))

    with ActivationAddition(["transformer.h.7.mlp"]).prepare(gpt2) as h:
        sv = (
            h(TensorDict({("positive", "input"): pos_ids, ("negative", "input"): neg_ids}, batch_size=1))
            .get(("steer", "transformer.h.7.mlp"))
            .sum(0)
        )
    with SteeringVectors(
        ["transformer.h.7.mlp"], steer_fn=lambda module_key, output: output + 4 * sv
    ).prepare(gpt2) as h:
        logits = h(TensorDict({"input": base_ids}, batch_size=1)).get(("output", "logits"))

    # The vector: mlp activations [1, T, D]; the mean over the batch gives [T, D]; .sum(0) sums tokens.
    with torch.no_grad():
        acts = {
            k: record(gpt2, ["transformer.h.7.mlp"], lambda ids=ids: gpt2(ids))["transformer.h.7.mlp"]
            for k, ids in (("pos", pos_ids), ("neg", neg_ids))
        }
    assert acts["pos"].shape == (1, 6, 16)
    assert sv.shape == (16,)
    torch.testing.assert_close(sv, (acts["pos"] - acts["neg"]).mean(0).sum(0))

    # The steered logits equal a hand-written forward hook adding 4·sv.
    handle = gpt2.transformer.h[7].mlp.register_forward_hook(lambda m, a, o: o + 4 * sv)
    try:
        with torch.no_grad():
            expected = gpt2(base_ids).logits
    finally:
        handle.remove()
    assert logits.shape == (1, 6, 50)
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():
        assert not torch.allclose(logits, gpt2(base_ids).logits)  # steering changed them


# -- caching (§8.1) ------------------------------------------------------------------------------


def test_caching_gpt2_mlps_recipe() -> None:
    gpt2 = tiny_gpt2(3)
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    with ActivationCaching(r"transformer\.h\.\d+\.mlp$").prepare(
        gpt2, in_keys=["input_ids"], out_keys=["logits"]
    ) as h:
        h(TensorDict({"input_ids": ids}, batch_size=ids.shape[:1]))
        acts = h.hooking_context.cache
    names = [f"transformer.h.{i}.mlp" for i in range(3)]
    assert sorted(acts.keys()) == names
    with torch.no_grad():
        expected = record(gpt2, names, lambda: gpt2(ids))
    for name in names:
        assert acts[name].shape == (2, 5, 16)
        torch.testing.assert_close(acts[name], expected[name])


# -- probing notebooks (§11.2) -----------------------------------------------------------------


def _sentiment_batch(n: int, seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    ids = torch.randint(2, 50, (n, 6), generator=g)
    ids[:, 2] = labels  # the label is a token of the input: a probe can find it
    return TensorDict({"input_ids": ids, "labels": labels}, batch_size=[n])


def test_linear_probing_notebook_recipe() -> None:
    model = tiny_gpt2(11)
    flat = lambda preds, labels: {"accuracy": accuracy_score(labels, preds)}  # noqa: E731
    manager = ProbeManager(LogisticRegression, {"max_iter": 500}, flat, data_preprocess_callback=None)
    train, test = _sentiment_batch(40, 3), _sentiment_batch(10, 4)
    with Probing(
        "transformer.h.(0|5|10).mlp$", manager.probe_factory, additional_keys=["labels", "step_type"]
    ).prepare(model, in_keys=["input_ids"], out_keys=["logits"]) as hooked:
        train["step_type"] = "fit"
        hooked(train)
        test["step_type"] = "predict"
        hooked(test)
    keys = ["transformer.h.0.mlp_fwd", "transformer.h.5.mlp_fwd", "transformer.h.10.mlp_fwd"]
    assert sorted(manager.fit_metrics) == sorted(keys)
    assert sorted(manager.predict_metrics) == sorted(keys)
    # Oracle: scikit-learn on the same activations, flattened as the default preprocessing does.
    names = [k.removesuffix("_fwd") for k in keys]
    with torch.no_grad():
        tr = record(model, names, lambda: model(train["input_ids"]))
        te = record(model, names, lambda: model(test["input_ids"]))
    for key, name in zip(keys, names):
        ref = LogisticRegression(max_iter=500).fit(tr[name].flatten(1).numpy(), train["labels"].numpy())
        assert manager.fit_metrics[key]["accuracy"] == accuracy_score(
            train["labels"].numpy(), ref.predict(tr[name].flatten(1).numpy())
        )
        assert manager.predict_metrics[key]["accuracy"] == accuracy_score(
            test["labels"].numpy(), ref.predict(te[name].flatten(1).numpy())
        )
        np.testing.assert_allclose(manager.estimators[key].coef_, ref.coef_, rtol=1e-3, atol=1e-7)


def last_token(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Hidden state of the last token of a GPT-2 block (a tuple in some transformers versions)."""
    hidden = output[0] if isinstance(output, tuple) else output
    return hidden[:, -1]


def test_bilinear_probing_notebook_recipe_relative_false_under_no_grad() -> None:
    """0.1's notebook probed nothing (relative=False) and its torch probes failed under no_grad."""
    model = tiny_gpt2(6)
    pairs = [("td_module.module.transformer.h.0", "td_module.module.transformer.h.5")]
    manager = BilinearProbeManager(
        pairs,
        LowRankBilinearEstimator,
        {"d_latent1": 16, "d_latent2": 16, "num_classes": 2, "epochs": 20, "lr": 0.05},
        lambda preds, labels: {"accuracy": float((preds == labels).float().mean())},
        data_preprocess_callback=last_token,
    )
    batch = _sentiment_batch(32, 5)
    batch["step_type"] = "fit"
    probing = Probing(
        manager.key_pattern, manager.probe_factory, relative=False, additional_keys=["labels", "step_type"]
    )
    with torch.no_grad(), probing.prepare(model, in_keys=["input_ids"], out_keys=["logits"]) as hooked:
        manager.before_all()
        hooked(batch)
        manager.after_all()
        assert not torch.is_grad_enabled()
    key = "td_module.module.transformer.h.0_td_module.module.transformer.h.5_fwd"
    assert list(manager.fit_metrics) == [key]
    estimator = manager.estimators[key]
    with torch.no_grad():
        blocks = record(model, ["transformer.h.0", "transformer.h.5"], lambda: model(batch["input_ids"]))
    h1, h2 = last_token(blocks["transformer.h.0"]), last_token(blocks["transformer.h.5"])
    preds = estimator.predict(h1, h2)
    assert manager.fit_metrics[key]["accuracy"] == float((preds == batch["labels"]).float().mean())


# -- TorchRL loss, relative=False (seed tutorial) --------------------------------------------


def ppo_loss_and_batch(n: int = 64):
    """The seed's actor/critic and ClipPPOLoss, built without an environment, and a batch for it."""
    pytest.importorskip("torchrl")
    from tensordict.nn import NormalParamExtractor
    from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
    from torchrl.objectives import ClipPPOLoss

    torch.manual_seed(0)
    obs_dim, act_dim, hidden = 9, 1, 32
    actor_module = TensorDictModule(
        nn.Sequential(
            MLP(in_features=obs_dim, out_features=2 * act_dim, num_cells=[hidden] * 3), NormalParamExtractor()
        ),
        in_keys=["observation"],
        out_keys=["loc", "scale"],
    )
    actor = ProbabilisticActor(
        module=actor_module,
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        distribution_kwargs={"low": -torch.ones(act_dim), "high": torch.ones(act_dim)},
        return_log_prob=True,
    )
    critic = TensorDictModule(
        MLP(in_features=obs_dim, out_features=1, num_cells=[hidden] * 3),
        in_keys=["observation"],
        out_keys=["state_value"],
    )
    loss = ClipPPOLoss(actor_network=actor, critic_network=critic, entropy_coeff=1e-4, functional=False)
    batch = TensorDict({"observation": torch.randn(n, obs_dim)}, batch_size=[n])
    with torch.no_grad():
        actor(batch)
    keys = loss.tensor_keys
    batch[keys.advantage] = torch.randn(n, 1)
    batch[keys.value_target] = torch.randn(n, 1)
    batch["next"] = TensorDict(
        {
            "observation": torch.randn(n, obs_dim),
            "reward": torch.randn(n, 1),
            "done": torch.zeros(n, 1, dtype=torch.bool),
            "terminated": torch.zeros(n, 1, dtype=torch.bool),
        },
        batch_size=[n],
    )
    return loss, critic, batch


@pytest.mark.rl
def test_caching_a_torchrl_loss_with_absolute_names() -> None:
    loss, critic, batch = ppo_loss_and_batch()
    with ActivationCaching(r"td_module\.critic_network\.module\.\d+$", relative=False).prepare(
        loss
    ) as hooked:
        out = hooked(batch.clone())
        cache = hooked.hooking_context.cache
    names = [f"td_module.critic_network.module.{i}" for i in range(7)]  # 3 × (Linear, Tanh) + Linear
    assert sorted(cache.keys(), key=lambda k: int(k.rsplit(".", 1)[1])) == names
    expected = record(critic.module, [str(i) for i in range(7)], lambda: critic.module(batch["observation"]))
    for i, name in enumerate(names):
        torch.testing.assert_close(cache[name], expected[str(i)])
    assert cache[names[-1]].shape == (64, 1)
    assert torch.isfinite(out["loss_objective"]).all()


@pytest.mark.rl
def test_probing_a_torchrl_loss_with_absolute_names() -> None:
    loss, critic, batch = ppo_loss_and_batch()
    manager = ProbeManager(LinearRegression, {}, lambda preds, labels: {"r2": r2_score(labels, preds)})
    batch["labels"] = batch["action"]
    batch["step_type"] = "fit"
    with Probing(
        r"td_module.(critic_network.module.\d+|actor_network.module.0.module.0.\d+)",
        manager.probe_factory,
        additional_keys=["labels", "step_type"],
        relative=False,
    ).prepare(loss) as hooked:
        hooked(batch)
    keys = set(manager.fit_metrics)
    assert "td_module.critic_network.module.0_fwd" in keys
    assert "td_module.actor_network.module.0.module.0.3_fwd" in keys
    assert len(keys) == 14  # 7 critic layers + 7 actor MLP layers
    acts = record(critic.module, ["2"], lambda: critic.module(batch["observation"]))["2"]
    ref = LinearRegression().fit(acts.detach().numpy(), batch["action"].numpy())
    expected = r2_score(batch["action"].numpy(), ref.predict(acts.detach().numpy()))
    assert manager.fit_metrics["td_module.critic_network.module.2_fwd"]["r2"] == pytest.approx(
        expected, abs=1e-9
    )
