"""Linear probes on every layer: tdhook's streaming regression vs scikit-learn's ``LinearRegression``.

Two models:

- ``mlp``: a 12-layer ReLU MLP (width 256, input 64, 4 targets, a smooth non-linear function of
  the input plus noise); every layer's activations are computed at set-up, batch by batch.
  The timed call is fit + score: ``tdhook`` feeds the batches to one ``StreamingLinearRegression``
  per layer (``partial_fit``, float64 statistics); ``sklearn64`` concatenates each layer's batches
  and calls ``LinearRegression().fit`` in float64; both then give the held-out R² of every layer. (scikit-learn in float32 is not a peer here: on the deep layers,
  whose live units have a standard deviation near 3e-5, its R² differs by up to 2e-2, so it
  cannot pass the gate.)
- ``ppo``: the seed's probing on its PPO agent (``examples/ppo_train_and_probe.py``'s actor and
  critic, 26 hooked layers of width 32, transitions collected once with the random-init agent and
  cached under ``bench/results/``). Both sides go through tdhook's API: the seed's protocol
  (``Probing`` + ``ProbeManager(LinearRegression)``, one ``fit`` on the training set, float64
  activations) against ``ProbeManager(StreamingLinearRegression)`` fed ``partial_fit`` batches.

The gate compares the held-out R² of every layer; peak RSS above set-up shows what keeping the
activations costs.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import torch

from .._harness import ROOT, Case, Impl, Task

DEPTH, WIDTH, INPUT, TARGETS, BATCH = 12, 256, 64, 4, 2048
PPO_BATCH, PPO_SEED = 2048, 0
CACHE = ROOT / "bench" / "results" / "cache"


# ------------------------------------------------------------------------------------- MLP


def probe_model(depth: int = DEPTH, width: int = WIDTH) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(INPUT, width)]
    layers += [torch.nn.Linear(width, width) for _ in range(depth - 1)]
    return torch.nn.ModuleList(layers).eval()


def probe_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, INPUT, generator=g)
    fixed = torch.Generator().manual_seed(99)
    lin = torch.randn(INPUT, TARGETS, generator=fixed) / math.sqrt(INPUT)
    freq = torch.randn(INPUT, TARGETS, generator=fixed) / math.sqrt(INPUT)
    y = x @ lin + 0.5 * torch.sin(2.0 * x @ freq) + 0.1 * torch.randn(n, TARGETS, generator=g)
    return x, y


@torch.no_grad()
def activations(model: torch.nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """The ReLU output of every layer."""
    out = []
    for layer in model:
        x = torch.relu(layer(x))
        out.append(x)
    return out


# ------------------------------------------------------------------------------------- PPO


def _ppo_example() -> Any:
    examples = str(ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import ppo_train_and_probe as example  # the demo's builders: the seed's env and networks

    return example


def _ppo_agent_and_data(frames: int) -> tuple[Any, Any, Any]:
    """The seed's agent and ``frames`` transitions labelled with its deterministic action (cached)."""
    from tensordict import TensorDict

    example = _ppo_example()
    env = example.make_env(PPO_SEED, torch.device("cpu"))
    path = CACHE / f"ppo-{frames}-seed{PPO_SEED}.pt"
    if not path.exists():
        torch.manual_seed(PPO_SEED)
        agent = example.make_agent(env, torch.device("cpu"))
        batch = example.collect(env, agent, frames, torch.device("cpu"))
        with example.set_exploration_type(example.ExplorationType.DETERMINISTIC), torch.no_grad():
            mode = agent.actor(batch.select(example.OBSERVATION_KEY).clone())[example.ACTION_KEY]
        batch[example.LABELS_KEY] = mode
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"batch": batch.to_dict(), "state": agent.loss.state_dict()}, tmp)
        os.replace(tmp, path)
    saved = torch.load(path, weights_only=False)
    batch = TensorDict(saved["batch"], batch_size=[len(saved["batch"][example.LABELS_KEY])])
    agent = example.make_agent(env, torch.device("cpu"))
    agent.loss.load_state_dict(saved["state"])
    return example, agent, batch


class _Ppo:
    """Both PPO sides: the seed's ``Probing`` on the agent's loss module, one estimator type each."""

    streaming = True

    def setup_ppo(self, params: dict[str, Any]) -> None:
        from sklearn.linear_model import LinearRegression
        from sklearn.metrics import r2_score

        from tdhook.latent.probing import ProbeManager, Probing
        from tdhook.latent.stats import StreamingLinearRegression

        example, agent, batch = _ppo_agent_and_data(params["frames"])
        n_train = int(example.TRAIN_FRACTION * batch.numel())
        train, self.test = batch[:n_train], batch[n_train:].clone(False)
        self.test[example.STEP_TYPE_KEY] = "predict"
        if self.streaming:
            estimator: type = StreamingLinearRegression
            steps = [(chunk, "partial_fit") for chunk in train.split(PPO_BATCH)]
        else:  # the seed's protocol, with the demo's float64 preprocessing
            estimator, steps = LinearRegression, [(train, "fit")]
        self.steps = []
        for chunk, step in steps:
            chunk = chunk.clone(False)
            chunk[example.STEP_TYPE_KEY] = step
            self.steps.append(chunk)
        preprocess = (
            (lambda data: data.detach().flatten(1))
            if self.streaming
            else (lambda data: data.detach().flatten(1).double())
        )
        self.make_manager = lambda: ProbeManager(
            estimator, {}, lambda p, y: {"r2": float(r2_score(y, p))}, data_preprocess_callback=preprocess
        )
        self.probing = lambda manager: Probing(
            example.LAYER_PATTERN,
            manager.probe_factory,
            additional_keys=[example.LABELS_KEY, example.STEP_TYPE_KEY],
            relative=False,
        )
        self.loss = agent.loss

    def run_ppo(self) -> None:
        manager = self.make_manager()
        with torch.no_grad(), self.probing(manager).prepare(self.loss) as hooked:
            for chunk in self.steps:
                hooked(chunk)
            hooked(self.test)
        self.r2 = torch.tensor([v["r2"] for v in manager.predict_metrics.values()], dtype=torch.float64)


# ----------------------------------------------------------------------------------- impls


class _Mlp:
    """The MLP's activations, computed once at set-up: per training batch, and on the test set."""

    def setup_mlp(self, params: dict[str, Any]) -> None:
        model = probe_model(params.get("depth", DEPTH), params.get("width", WIDTH))
        x_train, y_train = probe_data(params["n_train"], seed=1)
        self.batches = [
            (activations(model, xb), yb) for xb, yb in zip(x_train.split(BATCH), y_train.split(BATCH))
        ]
        x_test, self.y_test = probe_data(params["n_test"], seed=2)
        self.test_acts = activations(model, x_test)


class Tdhook(_Ppo, _Mlp, Impl):
    """``StreamingLinearRegression`` per layer, fed batch by batch (``partial_fit``)."""

    name = "tdhook"
    label = "tdhook StreamingLinearRegression, streamed (float64 statistics)"

    def setup(self, params):
        self.ppo = params["model"] == "ppo"
        self.setup_ppo(params) if self.ppo else self.setup_mlp(params)

    def run(self):
        from tdhook.latent.stats import StreamingLinearRegression

        if self.ppo:
            self.run_ppo()
            return
        probes = [StreamingLinearRegression() for _ in self.test_acts]
        for acts, yb in self.batches:
            for probe, act in zip(probes, acts):
                probe.partial_fit(act, yb)
        self.r2 = torch.tensor(
            [probe.score(act, self.y_test) for probe, act in zip(probes, self.test_acts)], dtype=torch.float64
        )

    def output(self):
        return self.r2


class Sklearn64(_Ppo, _Mlp, Impl):
    """``LinearRegression().fit`` on every layer's concatenated activations, float64."""

    name = "sklearn64"
    label = "sklearn LinearRegression, concatenated float64 activations (the seed's protocol on PPO)"
    streaming = False

    def setup(self, params):
        self.ppo = params["model"] == "ppo"
        self.setup_ppo(params) if self.ppo else self.setup_mlp(params)

    def run(self):
        from sklearn.linear_model import LinearRegression

        if self.ppo:
            self.run_ppo()
            return
        y = torch.cat([yb for _, yb in self.batches]).double().numpy()
        y_test = self.y_test.double().numpy()
        r2 = []
        for layer, test_act in enumerate(self.test_acts):
            x = torch.cat([acts[layer] for acts, _ in self.batches]).double().numpy()
            reg = LinearRegression().fit(x, y)
            r2.append(float(reg.score(test_act.double().numpy(), y_test)))
        self.r2 = torch.tensor(r2, dtype=torch.float64)

    def output(self):
        return self.r2


_MLP_SMOKE = {"model": "mlp", "n_train": 600, "n_test": 200, "depth": 3, "width": 32}
TASK = Task(
    name="probes_sklearn",
    title="Linear probes on every layer: streamed StreamingLinearRegression vs scikit-learn LinearRegression",
    env="dev",
    impls=[Tdhook, Sklearn64],
    cases=[
        Case(
            "MLP 12 layers, 20k train", {"model": "mlp", "n_train": 20000, "n_test": 5000}, smoke=_MLP_SMOKE
        ),
        Case("seed PPO agent, 26 layers, 50k frames", {"model": "ppo", "frames": 50000}, quick=False),
    ],
    rtol=0.0,
    atol=1e-6,  # held-out R² per layer, both in float64 (measured: ≤ 1e-7 apart)
    # the issue's ≥ 5× on fit + score; the PPO case (whole Probing calls) is reported only
    case_targets={"MLP 12 layers, 20k train": {"sklearn64": 0.2}},
    timing={"warmup": 1, "min_repeats": 3, "max_repeats": 10, "budget_s": 20.0},
)
