"""examples/transformer_circuits.py: the trained GPT-2 forms an induction circuit, and the analyses find it.

The full example (1000 training steps, about 75 s of CPU on one thread) runs as written: the
findings are only there once the induction heads have formed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transformer_circuits.py"


def load_example():
    spec = importlib.util.spec_from_file_location("transformer_circuits", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batches_repeat_a_segment_at_a_varying_distance() -> None:
    example = load_example()
    batch = example.induction_batch(256, torch.Generator().manual_seed(0))
    ids, first, repeat = batch.ids, batch.first, batch.repeat
    starts, distances = [], set()
    for row in range(len(ids)):
        a = first[row].nonzero().flatten()
        b = repeat[row].nonzero().flatten()
        assert len(b) == len(a) - 1  # every repeated token but the first is predictable
        distance = int(b[0] - a[1])
        assert torch.equal(ids[row, b], ids[row, b - distance])
        assert distance >= len(a)  # the copies do not overlap
        starts.append(int(a[0]))
        distances.add(distance)
    assert len(distances) > 20  # no fixed offset predicts the repeat
    assert len(set(starts)) > 20
    corrupted = example.corrupt(batch, torch.Generator().manual_seed(1))
    assert torch.equal(corrupted[~first], ids[~first])
    assert (corrupted[first] != ids[first]).float().mean() > 0.9


@pytest.mark.slow
def test_transformer_circuits_example_finds_the_induction_heads(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = load_example().main(["--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (
        json.loads((tmp_path / "transformer_circuits.json").read_text())["induction_score"]
        == r["induction_score"]
    )
    assert (tmp_path / "transformer_circuits.png").stat().st_size > 10_000
    assert "heads found by patching" in capsys.readouterr().out

    # the model learned induction: the repeat is predicted, far below the best loss on random tokens
    # (measured: 0.47 against ln 64 = 4.16)
    assert r["loss_repeat"] < r["uniform_loss"] / 4
    # the circuit: a previous-token head in layer 0, induction heads in layer 1 (measured 0.70; 0.88-0.89)
    prev, induction = torch.tensor(r["prev_token_score"]), torch.tensor(r["induction_score"])
    assert prev[0].max() > 0.5
    induction_heads = {(1, h) for h in range(4) if induction[1, h] > 0.5}
    assert induction_heads
    assert induction[0].max() < 0.2
    # head patching finds exactly the induction heads; layer 0 restores nothing on its own
    restored = torch.tensor(r["head_patching_restored"])
    assert {tuple(h) for h in r["heads_found_by_patching"]} == induction_heads
    assert restored[0].abs().max() < 0.1
    assert restored[1].sum() > 0.8  # together the induction heads carry the effect
    # ablating the previous-token head breaks the repeat (measured 3.9 against 0.47)
    prev_head = int(prev[0].argmax())
    assert r["ablated_loss_repeat"][0][prev_head] > 4 * r["loss_repeat"]
    # logit lens: the repeat is not readable after layer 0, it is after layer 1 (measured 0.01, 0.86)
    assert r["logit_lens_accuracy"][0] < 0.1
    assert r["logit_lens_accuracy"][1] > 0.7
    # attribution patching agrees with head patching (measured Spearman 1.000, Pearson 1.000)
    assert r["spearman_attribution_vs_patching"] > 0.9
    assert r["pearson_attribution_vs_patching"] > 0.95
    assert r["top_heads_attribution"][0] == r["top_heads_patching"][0]
    assert tuple(r["top_heads_patching"][0]) in induction_heads
