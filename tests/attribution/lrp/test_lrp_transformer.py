"""LRP end to end on a tiny pre-LN transformer block (LayerNorm, fused-QKV attention, MLP)."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn

from tdhook.attribution.lrp import (
    LRP,
    AHQKVInputRule,
    EpsilonPlus,
    LayerNormRule,
    SoftmaxEpsilonRule,
    Sum,
    UnconservedRelevanceError,
    raise_for_unconserved_rel_factory,
)


class Heads(nn.Module):
    """Multi-head attention core reading a fused ``[q, k, v]`` tensor."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.chunk(3, dim=-1)
        b, t, d = q.shape
        h = self.n_heads

        def split(u: torch.Tensor) -> torch.Tensor:
            return u.reshape(b, t, h, d // h).transpose(1, 2)

        attn = self.softmax(split(q) @ split(k).transpose(-1, -2) / (d // h) ** 0.5)
        return (attn @ split(v)).transpose(1, 2).reshape(b, t, d)


class Block(nn.Module):
    """Pre-LN block; the residual additions are ``Sum`` modules so that a rule splits them."""

    def __init__(self, d: int = 8, n_heads: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d, bias=bias)
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.heads = Heads(n_heads)
        self.proj = nn.Linear(d, d, bias=bias)
        self.add1 = Sum()
        self.ln2 = nn.LayerNorm(d, bias=bias)
        self.fc1 = nn.Linear(d, 2 * d, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d, bias=bias)
        self.add2 = Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.add1(torch.stack([x, self.proj(self.heads(self.qkv(self.ln1(x))))], dim=-1))
        return self.add2(torch.stack([h, self.fc2(self.act(self.fc1(self.ln2(h))))], dim=-1))


def transformer_rules(name: str, module: nn.Module):
    if isinstance(module, nn.LayerNorm):
        return LayerNormRule(epsilon=1e-6)
    if isinstance(module, Heads):
        return AHQKVInputRule()
    if isinstance(module, nn.Softmax):
        return SoftmaxEpsilonRule()
    return None


def _block(bias: bool) -> Block:
    torch.manual_seed(0)
    block = Block(bias=bias)
    with torch.no_grad():
        block.ln1.weight.uniform_(0.5, 1.5)
        block.ln2.weight.uniform_(0.5, 1.5)
    return block


def _run(block: Block, x: torch.Tensor) -> TensorDict:
    mapper = EpsilonPlus(epsilon=1e-9, rule_mapper=transformer_rules)
    with LRP(rule_mapper=mapper, init_relevance="outputs").prepare(block) as hooked:
        return hooked(TensorDict(input=x, batch_size=[2]))


def test_block_end_to_end_finite_and_model_untouched():
    block = _block(bias=True)
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8)
    expected = block(x)
    td = _run(block, x)
    relevance = td["attr", "input"]
    assert relevance.shape == x.shape
    assert torch.isfinite(relevance).all()
    torch.testing.assert_close(td["output"], expected.detach())
    for module in block.modules():
        assert "forward" not in vars(module)
        assert len(module._forward_hooks) == 0


def test_block_conserves_relevance_without_biases():
    block = _block(bias=False)
    torch.manual_seed(2)
    x = torch.randn(2, 5, 8)
    td = _run(block, x)
    total_in = td["attr", "input"].sum((1, 2))
    total_out = td["output"].sum((1, 2))
    scale = td["output"].abs().sum((1, 2))
    torch.testing.assert_close(total_in / scale, total_out / scale, rtol=0, atol=1e-4)


def test_layer_by_layer_conservation_check_passes_without_biases():
    block = _block(bias=False)
    x = torch.randn(2, 5, 8)
    check = raise_for_unconserved_rel_factory(atol=1e-3, rtol=1e-3)
    handles = [m.register_full_backward_hook(check) for m in (block.qkv, block.proj, block.fc1, block.fc2)]
    try:
        _run(block, x)
    finally:
        for handle in handles:
            handle.remove()
    assert issubclass(UnconservedRelevanceError, RuntimeError)
