"""Find the induction heads of a small GPT-2 trained in code on repeated random tokens (offline, < 2 min).

1. Train a two-layer Hugging Face GPT-2 (built from a config, random init, 4 heads per layer)
   on sequences of random tokens in which a random segment (6-16 tokens) comes again later, at
   a random distance. The repeat is predictable only by *induction*: find the previous
   occurrence of the current token and predict the token that followed it. Two layers are the
   least that can do it: a *previous-token head* in layer 0 writes "my previous token was A"
   at each position, and an *induction head* in layer 1 matches the current token A against
   it and copies the token found there. The training loss on the repeat falls far below the
   loss on the random tokens.
2. Attention patterns: each head's *prev-token score* (attention to the position just before)
   and *induction score* (attention, from a repeated token, to the token after its previous
   occurrence). Layer 0 holds a previous-token head, layer 1 induction heads.
3. Head patching (``HeadPatching``): the *clean* input is a sequence with its repeat, the
   *corrupted* one the same sequence with other tokens in place of the first occurrence, so
   looking back cannot help. Patch one head's output from the clean run into the corrupted run
   and measure the fraction of the clean metric (the mean logit of the correct next token over
   the repeat) it restores. The heads that restore it are the induction heads.
4. Head ablation (``HeadAblation``): the loss on the repeat with one head zeroed.
5. Logit lens (``LogitLens``): the residual stream after layer 0 does not predict the repeat;
   after layer 1 (where the induction heads write) it does.
6. Attribution patching (``AttributionPatching``): the head effects of step 3 estimated from one
   clean run, one corrupted run and one backward; compared with real head patching by rank
   (Spearman) and linear (Pearson) correlation over the 8 heads.

Prints a table and writes ``transformer_circuits.png`` and ``transformer_circuits.json`` to
``--out`` (default ``out/``, git-ignored)::

    python examples/transformer_circuits.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config: nothing to download

import torch
from tensordict import TensorDict
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

from tdhook.transformers import AttributionPatching, HeadAblation, HeadPatching, LogitLens, TransformerSpec

logging.set_verbosity_error()

VOCAB = 64
LENGTH = 48
SEG_MIN, SEG_MAX = 6, 16  # length of the repeated segment
HF = {"in_keys": {"input_ids": "input_ids"}, "out_keys": ["logits"]}


def build_model(seed: int) -> GPT2LMHeadModel:
    """A two-layer GPT-2, 4 heads of 16 dimensions, eager attention (so attention weights can be read)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_inner=64,
        vocab_size=VOCAB,
        n_positions=LENGTH,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


@dataclass
class Batch:
    """Token ids with a repeated segment, and where the segment lies.

    ``first``: the positions of the segment's first occurrence; ``repeat``: the positions of its
    second occurrence that induction can predict (all but its first token), both ``(n, LENGTH)``
    masks.
    """

    ids: torch.Tensor
    first: torch.Tensor
    repeat: torch.Tensor


def induction_batch(n: int, generator: torch.Generator) -> Batch:
    """Random tokens in which a random segment comes again at a random distance (at least its length).

    The segment length, its place and the distance all vary from sample to sample, so that no
    fixed position or offset predicts the repeat: only looking up the previous occurrence does.
    """
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    seg = torch.randint(SEG_MIN, SEG_MAX + 1, (n, 1), generator=generator)
    dist = seg + (torch.rand(n, 1, generator=generator) * (LENGTH - 2 * seg + 1)).long()
    start = (torch.rand(n, 1, generator=generator) * (LENGTH - seg - dist + 1)).long()
    pos = torch.arange(LENGTH)
    second = (pos >= start + dist) & (pos < start + dist + seg)
    ids = torch.where(second, ids.gather(1, (pos - dist).clamp(min=0)), ids)
    first = (pos >= start) & (pos < start + seg)
    return Batch(ids, first, second & (pos > start + dist))


def corrupt(batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """The same ids with other random tokens in place of the segment's first occurrence."""
    other = torch.randint(0, VOCAB, batch.ids.shape, generator=generator)
    return torch.where(batch.first, other, batch.ids)


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position ``(n, LENGTH)``; position ``p`` is the loss of predicting ``ids[:, p]``."""
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )
    return torch.nn.functional.pad(losses.view(len(ids), -1), (1, 0))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values * mask).sum() / mask.sum())


def correct_logit(batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
    """metric(logits) -> (n,): the mean logit of the correct next token over each sample's repeat."""
    mask = batch.repeat[:, 1:].float()
    targets = batch.ids[:, 1:, None]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        correct = logits[:, :-1].gather(-1, targets).squeeze(-1)
        return (correct * mask).sum(-1) / mask.sum(-1)

    return metric


def repeat_accuracy(logits: torch.Tensor, batch: Batch) -> float:
    hits = (logits[:, :-1].argmax(-1) == batch.ids[:, 1:]).float()
    return masked_mean(hits, batch.repeat[:, 1:])


def train(model: GPT2LMHeadModel, steps: int, batch_size: int, generator: torch.Generator) -> list[float]:
    """AdamW on the next-token loss over the repeat; returns the loss every 50 steps.

    Only the repeat is trained: the other tokens are random, and with them in the loss (a plain
    mean over every position, or half the weight) the induction heads had not formed after 700
    steps, against about 500 steps with the repeat alone.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    curve = []
    for step in range(steps):
        batch = induction_batch(batch_size, generator)
        losses = token_losses(model(batch.ids).logits, batch.ids)
        loss = (losses * batch.repeat).sum() / batch.repeat.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            curve.append(loss.item())
    model.eval()
    return curve


def attention_scores(model: GPT2LMHeadModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head ``(layers, heads)``: the prev-token score and the induction score.

    Prev-token: the mean attention from each position to the one before it. Induction: the mean
    attention, from each position whose next token is predictable by induction, to the
    positions whose *previous* token equals its own token (the token after an earlier occurrence).
    """
    with torch.no_grad():
        attentions = model(batch.ids, output_attentions=True).attentions  # each (n, heads, q, k)
    ids = batch.ids
    before = torch.nn.functional.pad(ids[:, :-1], (1, 0), value=-1)  # the token before each key
    earlier = torch.ones(LENGTH, LENGTH).tril(-1).bool()
    follows_match = (before[:, None, :] == ids[:, :, None]) & earlier  # (n, q, k)
    queries = torch.nn.functional.pad(batch.repeat[:, 1:], (0, 1))  # q predicts q + 1 in the repeat
    prev, induction = [], []
    for weights in attentions:
        prev.append(torch.diagonal(weights, -1, -2, -1).mean((0, 2)))
        on_match = (weights * follows_match[:, None]).sum(-1)  # (n, heads, q)
        induction.append((on_match * queries[:, None]).sum((0, 2)) / queries.sum())
    return torch.stack(prev), torch.stack(induction)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (no ties expected among real-valued effects)."""
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the plot and the JSON")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="skip the matplotlib figure")
    args = parser.parse_args(argv)
    start, cpu_start = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(args.seed)
    model = build_model(args.seed)
    curve = train(model, args.steps, args.batch, generator)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    spec = TransformerSpec.from_model(model)
    n_layers, n_heads = spec.n_layers, spec.n_heads

    batch = induction_batch(128, generator)
    corrupted = corrupt(batch, generator)
    with torch.no_grad():
        losses = token_losses(model(batch.ids).logits, batch.ids)
    # the first occurrence (but its first token, which follows an unrelated one): random tokens
    loss_random = masked_mean(losses, batch.first & batch.first.roll(1, 1))
    loss_repeat = masked_mean(losses, batch.repeat)

    # 1. attention patterns
    prev_score, induction_score = attention_scores(model, batch)

    # 2. head patching: one patched run per head
    metric = correct_logit(batch)
    td = TensorDict(
        {"input_ids": batch.ids, ("patched", "input_ids"): corrupted}, batch_size=[len(batch.ids)]
    )
    with torch.no_grad():
        clean_metric = float(metric(model(batch.ids).logits).mean())
        corrupted_metric = float(metric(model(corrupted).logits).mean())
    gap = clean_metric - corrupted_metric
    restored = torch.zeros(n_layers, n_heads)
    ablated = torch.zeros(n_layers, n_heads)
    for layer in range(n_layers):
        for head in range(n_heads):
            with torch.no_grad(), HeadPatching([(layer, head)]).prepare(model, **HF) as hooked:
                patched = float(metric(hooked(td.clone())["patched", "logits"]).mean())
            restored[layer, head] = (patched - corrupted_metric) / gap
            # 3. head ablation: the loss on the repeat with this head zeroed
            with torch.no_grad(), HeadAblation([(layer, head)]).prepare(model, **HF):
                ablated[layer, head] = masked_mean(
                    token_losses(model(batch.ids).logits, batch.ids), batch.repeat
                )
    found = [
        (layer, head) for layer in range(n_layers) for head in range(n_heads) if restored[layer, head] > 0.1
    ]

    # 4. logit lens: accuracy on the repeat of each layer's residual stream
    with torch.no_grad(), LogitLens().prepare(model, **HF) as hooked:
        hooked(TensorDict(input_ids=batch.ids, batch_size=[len(batch.ids)]))
    lens = hooked.hooking_context.cache["lens"]
    lens_accuracy = [repeat_accuracy(lens[str(layer)], batch) for layer in range(n_layers)]

    # 5. attribution patching: every head at once
    with AttributionPatching(metric).prepare(model, **HF) as hooked:
        estimated = hooked(td.clone())["attr_patching", "head"].mean(0) / gap
    spearman = rank_correlation(estimated, restored)
    pearson = float(torch.corrcoef(torch.stack([estimated.flatten(), restored.flatten()]))[0, 1])

    def heads_by(values: torch.Tensor) -> list[tuple[int, int]]:
        return [(int(i) // n_heads, int(i) % n_heads) for i in values.flatten().argsort(descending=True)]

    results = {
        "train_steps": args.steps,
        "train_seconds": train_s,
        "train_cpu_seconds": train_cpu_s,
        "train_loss_curve": curve,
        "loss_random_tokens": loss_random,
        "loss_repeat": loss_repeat,
        "uniform_loss": math.log(VOCAB),
        "prev_token_score": prev_score.tolist(),
        "induction_score": induction_score.tolist(),
        "head_patching_restored": restored.tolist(),
        "heads_found_by_patching": found,
        "top_heads_patching": heads_by(restored)[:4],
        "ablated_loss_repeat": ablated.tolist(),
        "logit_lens_accuracy": lens_accuracy,
        "attribution_patching_restored": estimated.tolist(),
        "top_heads_attribution": heads_by(estimated)[:4],
        "spearman_attribution_vs_patching": spearman,
        "pearson_attribution_vs_patching": pearson,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "threads": torch.get_num_threads(),
    }
    report(results, n_layers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transformer_circuits.json").write_text(json.dumps(results, indent=2))
    if not args.no_plot:
        plot(results, args.out / "transformer_circuits.png")
    return results


def report(r: dict[str, Any], n_layers: int) -> None:
    def rows(name: str, values: list[list[float]], fmt: str = "{:+.2f}") -> None:
        print(name)
        for layer in range(n_layers):
            print(f"  layer {layer}: " + "  ".join(fmt.format(v) for v in values[layer]))

    print(
        f"trained {r['train_steps']} steps in {r['train_seconds']:.0f} s ({r['train_cpu_seconds']:.0f} s CPU): "
        f"loss {r['loss_repeat']:.2f} on the repeat, {r['loss_random_tokens']:.2f} on the segment's first "
        f"occurrence (random tokens, not trained; the best possible there is ln {VOCAB} = {r['uniform_loss']:.2f})"
    )
    rows("prev-token score (attention to the position before)", r["prev_token_score"], "{:.2f}")
    rows(
        "induction score (attention to the token after the previous occurrence)",
        r["induction_score"],
        "{:.2f}",
    )
    rows("head patching: fraction of the clean metric restored", r["head_patching_restored"])
    rows("head ablation: loss on the repeat with the head zeroed", r["ablated_loss_repeat"], "{:.2f}")
    rows("attribution patching: estimated fraction restored", r["attribution_patching_restored"])
    print(f"heads found by patching (> 0.1 restored): {r['heads_found_by_patching']}")
    print(
        "attribution vs head patching over the heads: "
        f"Spearman {r['spearman_attribution_vs_patching']:.3f}, Pearson {r['pearson_attribution_vs_patching']:.3f}"
    )
    print(
        "logit-lens accuracy on the repeat per layer: "
        + ", ".join(f"{a:.2f}" for a in r["logit_lens_accuracy"])
    )
    print(f"total: {r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU, {r['threads']} thread(s)")


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    restored = torch.tensor(r["head_patching_restored"])
    estimated = torch.tensor(r["attribution_patching_restored"])
    limit = float(max(restored.abs().max(), estimated.abs().max()))
    panels = (
        (axes[0], r["prev_token_score"], "prev-token score", "viridis", (0, 1)),
        (axes[1], r["induction_score"], "induction score", "viridis", (0, 1)),
        (axes[2], restored, "head patching: fraction restored", "RdBu_r", (-limit, limit)),
        (axes[3], estimated, "attribution patching (estimate)", "RdBu_r", (-limit, limit)),
    )
    for ax, values, title, cmap, (lo, hi) in panels:
        values = torch.as_tensor(values).numpy()
        image = ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi)
        ax.set(title=title, xlabel="head", ylabel="layer")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        fig.colorbar(image, ax=ax, shrink=0.8)
    layers = [f"after layer {i}" for i in range(len(r["logit_lens_accuracy"]))]
    axes[4].bar(layers, r["logit_lens_accuracy"])
    axes[4].set(title="logit lens: accuracy on the repeat", ylim=(0, 1))
    fig.suptitle(
        f"Induction in a 2-layer GPT-2: attribution vs head patching, Spearman "
        f"{r['spearman_attribution_vs_patching']:.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
