"""Find the heads that solve an induction task in a small GPT-2 trained in code (offline, < 2 min on 2 cores).

1. Train a two-layer Hugging Face GPT-2 (built from a config, random init) on induction: random
   tokens whose first segment comes again after a gap of random length; the repeat is
   predictable only by looking back at what followed the current token the first time.
2. Head patching (``HeadPatching``): the *clean* input is a repeated sequence, the *corrupted*
   one has another first half, so no look-back can help. Patch each head's output from the clean
   run into the corrupted run and measure how much of the clean metric (the mean logit of the
   correct next token over the repeat) it restores. The heads that do the look-back restore
   the most.
3. Logit lens (``LogitLens``): how well each layer's residual stream already predicts the
   repeat, layer by layer.
4. Attribution patching (``AttributionPatching``): the same head effects estimated from one
   clean run, one corrupted run and one backward; they agree with real head patching.

Prints a table and writes ``transformer_circuits.png`` and ``transformer_circuits.json`` to
``--out`` (default ``out/``, git-ignored)::

    python examples/transformer_circuits.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config: nothing to download

import torch
from tensordict import TensorDict
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

from tdhook.transformers import AttributionPatching, HeadPatching, LogitLens, TransformerSpec

logging.set_verbosity_error()

VOCAB = 48
SEG = 6  # a random segment, repeated later in the sequence after a gap of random length
LENGTH = 16
HF = {"in_keys": {"input_ids": "input_ids"}, "out_keys": ["logits"]}


def build_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_inner=128,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def induction_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens in which a random segment comes again later, both at random places.

    The look-back offset varies from sample to sample (within the few values a short sequence
    allows, so positions still carry some information). Returns the ids ``(n, LENGTH)`` and
    the positions of the repeat's predictable tokens ``(n, SEG - 1)``.
    """
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    first = torch.randint(0, LENGTH - 2 * SEG + 1, (n, 1), generator=generator)
    second = first + SEG + (torch.rand(n, 1, generator=generator) * (LENGTH - 2 * SEG + 1 - first)).long()
    ids.scatter_(1, second + torch.arange(SEG), ids.gather(1, first + torch.arange(SEG)))
    return ids, (second + torch.arange(SEG))[:, 1:]


def correct_logit(ids: torch.Tensor, targets: torch.Tensor):
    """metric(logits) -> (B,): the mean logit of the correct next token over the repeat."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        predicted = logits.gather(1, (targets - 1)[..., None].expand(-1, -1, logits.shape[-1]))
        return predicted.gather(-1, ids.gather(1, targets)[..., None]).squeeze(-1).mean(-1)

    return metric


def repeat_accuracy(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> float:
    predicted = logits.argmax(-1).gather(1, targets - 1)
    return float((predicted == ids.gather(1, targets)).float().mean())


def train(model: GPT2LMHeadModel, steps: int, batch: int, generator: torch.Generator) -> float:
    """AdamW on the next-token loss of the repeat; returns the accuracy on the repeat afterwards."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        ids, targets = induction_batch(batch, generator)
        logits = model(ids).logits.gather(1, (targets - 1)[..., None].expand(-1, -1, VOCAB))
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), ids.gather(1, targets).reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        ids, targets = induction_batch(256, generator)
        return repeat_accuracy(model(ids).logits, ids, targets)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the plot and the JSON")
    parser.add_argument("--steps", type=int, default=800, help="training steps")
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib figure")
    args = parser.parse_args(argv)
    start, cpu_start = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(args.seed)
    model = build_model(args.seed)
    accuracy = train(model, args.steps, args.batch, generator)
    spec = TransformerSpec.from_model(model)
    train_s = time.perf_counter() - start

    # clean: a repeated segment; corrupted: another first segment, so looking back cannot help
    clean, targets = induction_batch(64, generator)
    repeat = torch.cat([targets[:, :1] - 1, targets], dim=1)
    corrupted = torch.randint(0, VOCAB, clean.shape, generator=generator)
    corrupted.scatter_(1, repeat, clean.gather(1, repeat))  # the same repeat, after other tokens
    metric = correct_logit(clean, targets)
    td = TensorDict({"input_ids": clean, ("patched", "input_ids"): corrupted}, batch_size=[64])

    # 1. head patching: one run per head
    with torch.no_grad():
        clean_metric = metric(model(clean).logits).mean()
        corrupted_metric = metric(model(corrupted).logits).mean()
    restored = torch.zeros(spec.n_layers, spec.n_heads)
    for layer in range(spec.n_layers):
        for head in range(spec.n_heads):
            with torch.no_grad(), HeadPatching([(layer, head)]).prepare(model, **HF) as hooked:
                patched = metric(hooked(td.clone())["patched", "logits"]).mean()
            restored[layer, head] = (patched - corrupted_metric) / (clean_metric - corrupted_metric)
    top_heads = [
        (int(i) // spec.n_heads, int(i) % spec.n_heads)
        for i in restored.flatten().argsort(descending=True)[:2]
    ]

    # 2. logit lens: accuracy on the repeat of each layer's residual stream
    with torch.no_grad(), LogitLens().prepare(model, **HF) as hooked:
        hooked(TensorDict(input_ids=clean, batch_size=[64]))
    lens = hooked.hooking_context.cache["lens"]
    lens_accuracy = [repeat_accuracy(lens[str(layer)], clean, targets) for layer in range(spec.n_layers)]

    # 3. attribution patching: every head at once
    with AttributionPatching(metric).prepare(model, **HF) as hooked:
        estimated = hooked(td.clone())["attr_patching", "head"].mean(0) / (clean_metric - corrupted_metric)
    correlation = float(torch.corrcoef(torch.stack([estimated.flatten(), restored.flatten()]))[0, 1])
    top_estimated = [
        (int(i) // spec.n_heads, int(i) % spec.n_heads)
        for i in estimated.flatten().argsort(descending=True)[:2]
    ]

    results = {
        "train_accuracy_repeat": accuracy,
        "train_seconds": train_s,
        "head_patching_restored": restored.tolist(),
        "top_heads_patching": top_heads,
        "logit_lens_accuracy": lens_accuracy,
        "attribution_patching_restored": estimated.tolist(),
        "attribution_top_heads": top_estimated,
        "correlation_attribution_vs_patching": correlation,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }
    print(f"trained {args.steps} steps in {train_s:.0f} s: accuracy on the repeat {accuracy:.2f}")
    print("fraction of the clean metric restored by patching one head (rows: layers)")
    for layer in range(spec.n_layers):
        print(f"  layer {layer}: " + "  ".join(f"{v:+.2f}" for v in restored[layer].tolist()))
    print(f"top heads by head patching: {top_heads}; by attribution patching: {top_estimated}")
    print(f"attribution vs head patching, correlation over heads: {correlation:.3f}")
    print("logit-lens accuracy on the repeat per layer: " + ", ".join(f"{a:.2f}" for a in lens_accuracy))
    print(f"total: {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformer_circuits.json").write_text(json.dumps(results, indent=2))
    if not args.no_plot:
        plot(restored, estimated, lens_accuracy, args.out / "transformer_circuits.png")
    return results


def plot(restored: torch.Tensor, estimated: torch.Tensor, lens_accuracy: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    limit = float(max(restored.abs().max(), estimated.abs().max()))
    for ax, values, title in (
        (axes[0], restored, "head patching"),
        (axes[1], estimated, "attribution patching"),
    ):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set(title=f"{title}: fraction restored", xlabel="head", ylabel="layer")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        fig.colorbar(image, ax=ax, shrink=0.8)
    axes[2].bar([f"layer {i}" for i in range(len(lens_accuracy))], lens_accuracy)
    axes[2].set(title="logit lens: accuracy on the repeat", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
