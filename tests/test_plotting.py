"""tdhook.plotting: heatmaps, bars and grids draw, and bad shapes raise with the shape."""

from __future__ import annotations

import pytest
import torch

plt = pytest.importorskip("matplotlib.pyplot")
pytest.importorskip("matplotlib").use("Agg")

from tdhook.plotting import attribution_bars, attribution_grid, attribution_heatmap  # noqa: E402


def test_heatmap_bars_grid(tmp_path):
    image = attribution_heatmap(torch.randn(3, 8, 8), torch.rand(8, 8), title="ig")
    assert image.get_clim()[0] == -image.get_clim()[1]
    bars = attribution_bars(torch.tensor([0.5, -1.0, 2.0]), ["a", "b", "c"], top_k=2)
    assert [b.get_height() for b in bars] == [2.0, -1.0]
    fig = attribution_grid(torch.rand(2, 1, 8, 8), {"ig": torch.randn(2, 1, 8, 8)}, titles=["0", "1"])
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").exists()
    plt.close("all")


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\[H, W\] or \[C, H, W\].*\(2, 2, 2, 2\)"):
        attribution_heatmap(torch.randn(2, 2, 2, 2))
    with pytest.raises(ValueError, match="2 labels for 3 attributions"):
        attribution_bars(torch.randn(3), ["a", "b"])
