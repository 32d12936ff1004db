"""Steer a digit classifier from "3" to "8" with a steering vector (runs offline in seconds).

1. Train a small MLP on scikit-learn's digits (8×8 images, bundled with scikit-learn).
2. ``ActivationAddition``: the steering vector of the hidden layer is the mean activation of
   training "8"s minus that of training "3"s.
3. ``SteeringVectors``: add ``scale × vector`` to the hidden layer while classifying the test
   "3"s, for several scales, and count how many are now classified as "8". A random vector of the
   same norm is the control: it should not move the predictions towards "8".
4. A composite (steering + caching) checks the hidden layer really moved by the vector.

Prints a table and writes ``digits_steering.png`` and ``digits_steering.json`` to ``--out``::

    python examples/digits_steering.py --out /tmp/steering
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tensordict import TensorDict
from torch import nn

from tdhook.contexts import CompositeHookingContextFactory
from tdhook.latent import ActivationAddition, ActivationCaching, SteeringVectors

LAYER = "2"  # the second Linear layer: its output is the steered hidden representation
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


def build_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_train, x_test, y_train, y_test


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def predict(hooked: Any, x: torch.Tensor) -> torch.Tensor:
    return hooked(TensorDict(input=x, batch_size=x.shape[:1]))["output"].argmax(-1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the plot and the JSON")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch Adam steps")
    parser.add_argument("--source", type=int, default=3, help="digit to steer away from")
    parser.add_argument("--target", type=int, default=8, help="digit to steer towards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib figure")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = build_model()
    train(model, x_train, y_train, args.epochs)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(-1) == y_test).float().mean())
    print(f"test accuracy: {accuracy:.3f}")

    # Steering vector: mean hidden activation of the target digit minus that of the source digit.
    positive, negative = x_train[y_train == args.target], x_train[y_train == args.source]
    n = min(len(positive), len(negative))
    pairs = TensorDict(
        {("positive", "input"): positive[:n], ("negative", "input"): negative[:n]}, batch_size=[n]
    )
    with torch.no_grad(), ActivationAddition([LAYER]).prepare(model) as hooked:
        vector = hooked(pairs)["steer", LAYER]
    control = torch.randn_like(vector)
    control *= vector.norm() / control.norm()
    print(f"steering vector at layer {LAYER!r}: shape {tuple(vector.shape)}, norm {float(vector.norm()):.2f}")

    sources = x_test[y_test == args.source]
    rows = []
    for scale in SCALES:
        row = {"scale": scale}
        for name, v in (("steering", vector), ("control", control)):
            with (
                torch.no_grad(),
                SteeringVectors([LAYER], vectors={LAYER: v}, scale=scale).prepare(model) as hooked,
            ):
                predictions = predict(hooked, sources)
            row[name] = float((predictions == args.target).float().mean())
        rows.append(row)

    print(f"\nfraction of test {args.source}s classified as {args.target}")
    print(f"{'scale':>6} {'steering':>9} {'control':>8}")
    for row in rows:
        print(f"{row['scale']:>6.2f} {row['steering']:>9.2f} {row['control']:>8.2f}")

    # Composition: steer and cache the steered layer in the same forward.
    composite = CompositeHookingContextFactory(
        SteeringVectors([LAYER], vectors={LAYER: vector}), ActivationCaching(rf"{LAYER}$")
    )
    with torch.no_grad():
        plain = model[:3](sources)  # outside the context: calling the model inside would fire the hooks
        with composite.prepare(model) as hooked:
            hooked(TensorDict(input=sources, batch_size=sources.shape[:1]))
        shift = hooked.hooking_context.cache[LAYER] - plain
    shift_error = float((shift - vector).abs().max())
    print(f"\ncached steered activation minus plain activation = vector (max error {shift_error:.1e})")

    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "test_accuracy": accuracy,
        "layer": LAYER,
        "source": args.source,
        "target": args.target,
        "vector_norm": float(vector.norm()),
        "rows": rows,
        "shift_error": shift_error,
    }
    (args.out / "digits_steering.json").write_text(json.dumps(results, indent=2))
    if not args.no_plot:
        results["figure"] = str(plot(rows, args.source, args.target, args.out / "digits_steering.png"))
        print(f"wrote {results['figure']}")
    return results


def plot(rows: list[dict[str, float]], source: int, target: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    scales = [r["scale"] for r in rows]
    ax.plot(scales, [r["steering"] for r in rows], "o-", label=f"steering vector ({target} − {source})")
    ax.plot(scales, [r["control"] for r in rows], "s--", label="random vector, same norm")
    ax.set_xlabel("scale")
    ax.set_ylabel(f"test {source}s classified as {target}")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="center right")
    ax.set_title("Activation steering on digits (tdhook)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and fair to other jobs
    main()
