"""Train a small CNN on scikit-learn's digits, then explain a few digits with IG and LRP.

Offline and fast (a few seconds on CPU). Saves a figure (image | IG | LRP per row) and prints the
IG completeness error (the convergence delta).

Usage::

    python examples/digits_attribution.py                  # writes out/digits_attribution.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from tensordict import TensorDict
from torch import nn

from tdhook.attribution import IntegratedGradients
from tdhook.attribution.lrp import LRP, EpsilonPlus


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def train(epochs: int = 15, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(x_train), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[i : i + 64]), y_train[i : i + 64]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return model, x_test, y_test, accuracy


def explain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """IG (zero baseline, the logit of the true class) and LRP (EpsilonPlus) maps."""
    td = TensorDict(input=images, batch_size=[len(images)])
    td["baseline", "input"] = torch.zeros_like(images)
    td["label", "output"] = labels

    def pick(targets, additional):
        return IntegratedGradients.init_attr_targets_with_labels(targets, additional, ["output"])

    ig = IntegratedGradients(
        init_attr_targets=pick,
        additional_init_keys=["label"],
        multiply_by_inputs=True,
        compute_convergence_delta=True,
        n_steps=32,
    )
    with ig.prepare(model) as hooked:
        td = hooked(td)
    maps = {"IG": td["attr", "input"], "delta": td["convergence_delta"]}
    lrp_td = TensorDict(input=images, batch_size=[len(images)])
    lrp_td["label", "output"] = labels
    lrp = LRP(rule_mapper=EpsilonPlus(), init_attr_targets=pick, additional_init_keys=["label"])
    with lrp.prepare(model) as hooked:
        maps["LRP"] = hooked(lrp_td)["attr", "input"]
    return maps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/digits_attribution.png", help="figure path (git-ignored out/)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args(argv)
    model, x_test, y_test, accuracy = train(args.epochs)
    images, labels = x_test[: args.n], y_test[: args.n]
    maps = explain(model, images, labels)
    print(f"test accuracy {accuracy:.3f}; IG |delta| max {maps['delta'].abs().max():.2e}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        from tdhook.plotting import attribution_grid

        fig = attribution_grid(
            images, {"IG": maps["IG"], "LRP": maps["LRP"]}, titles=[f"digit {int(t)}" for t in labels]
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=80)
        print(f"saved {args.out}")
    except ImportError:
        print("matplotlib missing: no figure (pip install 'tdhook[plot]')")
    return {"accuracy": accuracy, "delta": float(maps["delta"].abs().max())}


if __name__ == "__main__":
    main()
