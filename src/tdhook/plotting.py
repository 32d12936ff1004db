"""Plotting helpers for attributions (optional extra ``plot``: ``pip install tdhook[plot]``).

matplotlib is imported on first use, so ``import tdhook.plotting`` works without it; calling a
function without it raises an ``ImportError`` naming the extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import IncompatibleInputsError

__all__ = ["attribution_bars", "attribution_grid", "attribution_heatmap"]


def _plt() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tdhook.plotting needs matplotlib: install the 'plot' extra (pip install 'tdhook[plot]')."
        ) from err
    return plt


def _map2d(attr: torch.Tensor, channel_reduce: str) -> torch.Tensor:
    a = torch.as_tensor(attr).detach().float().cpu()
    if a.dim() == 3:  # [C, H, W]
        a = a.sum(0) if channel_reduce == "sum" else a.abs().sum(0)
    if a.dim() != 2:
        raise IncompatibleInputsError(
            f"attribution_heatmap expects a [H, W] or [C, H, W] map, got shape {tuple(a.shape)}. Plot one "
            "sample at a time, e.g. attribution_heatmap(attr[0])."
        )
    return a


def attribution_heatmap(
    attr: torch.Tensor,
    image: torch.Tensor | None = None,
    *,
    ax: Any = None,
    cmap: str = "bwr",
    channel_reduce: str = "sum",
    alpha: float = 0.6,
    title: str | None = None,
) -> Any:
    """Draw a signed heatmap (symmetric colour scale), optionally over a grey image.

    Args:
        attr: ``[H, W]`` or ``[C, H, W]`` attribution.
        image: Optional ``[H, W]`` or ``[C, H, W]`` image drawn underneath.
        ax: Matplotlib axes (default: a new figure's).
        cmap: Colour map (diverging, centred on 0).
        channel_reduce: ``"sum"`` or ``"abs"`` over channels.
        alpha: Opacity of the heatmap over the image.
        title: Axes title.

    Returns:
        The matplotlib ``AxesImage`` of the heatmap.

    Raises:
        IncompatibleInputsError: For a map that is not 2-D or 3-D (a ``ValueError``).
        ImportError: Without matplotlib.
    """
    plt = _plt()
    a = _map2d(attr, channel_reduce)
    if ax is None:
        _, ax = plt.subplots()
    if image is not None:
        img = _map2d(image, "sum")
        ax.imshow(img, cmap="gray")
    vmax = float(a.abs().max()) or 1.0
    shown = ax.imshow(a, cmap=cmap, vmin=-vmax, vmax=vmax, alpha=alpha if image is not None else 1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return shown


def attribution_bars(
    attr: torch.Tensor,
    labels: Sequence[str] | None = None,
    *,
    ax: Any = None,
    top_k: int | None = None,
    title: str | None = None,
) -> Any:
    """Bar chart of per-feature or per-token attributions (positive red, negative blue).

    Args:
        attr: ``[F]`` attributions (or ``[T, D]`` token attributions, summed over ``D``).
        labels: Feature or token names.
        ax: Matplotlib axes.
        top_k: Only the ``top_k`` largest magnitudes.
        title: Axes title.

    Returns:
        The matplotlib bar container.
    """
    plt = _plt()
    a = torch.as_tensor(attr).detach().float().cpu()
    if a.dim() == 2:
        a = a.sum(-1)
    if a.dim() != 1:
        raise IncompatibleInputsError(
            f"attribution_bars expects [F] or [T, D] attributions, got shape {tuple(a.shape)}. Plot one sample at "
            "a time, e.g. attribution_bars(attr[0])."
        )
    names = list(labels) if labels is not None else [str(i) for i in range(a.numel())]
    if len(names) != a.numel():
        raise IncompatibleInputsError(
            f"{len(names)} labels for {a.numel()} attributions; pass one label per feature (or labels=None)."
        )
    order = torch.arange(a.numel())
    if top_k is not None:
        order = a.abs().argsort(descending=True)[:top_k]
    if ax is None:
        _, ax = plt.subplots()
    values = a[order].tolist()
    bars = ax.bar(range(len(values)), values, color=["tab:red" if v >= 0 else "tab:blue" for v in values])
    ax.set_xticks(range(len(values)), [names[i] for i in order.tolist()], rotation=60)
    ax.axhline(0, color="black", linewidth=0.5)
    if title:
        ax.set_title(title)
    return bars


def attribution_grid(
    images: torch.Tensor, maps: dict[str, torch.Tensor], *, titles: Sequence[str] | None = None
) -> Any:
    """A figure with one row per image: the image, then one heatmap per method in ``maps``.

    Args:
        images: ``[N, C, H, W]`` or ``[N, H, W]`` images.
        maps: ``{method_name: [N, ...] attributions}``.
        titles: Optional row titles.

    Returns:
        The matplotlib figure.
    """
    plt = _plt()
    n = images.shape[0]
    fig, axes = plt.subplots(n, 1 + len(maps), figsize=(2 * (1 + len(maps)), 2 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(_map2d(images[i], "sum"), cmap="gray")
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        if titles is not None:
            axes[i, 0].set_title(titles[i])
        for j, (name, m) in enumerate(maps.items(), start=1):
            attribution_heatmap(m[i], ax=axes[i, j], title=name if i == 0 else None)
    fig.tight_layout()
    return fig
