"""Contract cases of the transformer methods (head targets, logit lens) on a tiny GPT-2 from a config."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tensordict import TensorDict

from tdhook.transformers import AttributionPatching, HeadAblation, HeadCaching, HeadPatching, LogitLens

from ._case import ContractCase

HF = {"in_keys": {"input_ids": "input_ids"}, "out_keys": ["logits"]}


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _data(_: Any) -> TensorDict:
    g = torch.Generator().manual_seed(1)
    return TensorDict(
        {
            "input_ids": torch.randint(0, 32, (2, 5), generator=g),
            ("patched", "input_ids"): torch.randint(0, 32, (2, 5), generator=g),
        },
        batch_size=[2],
    )


CASES = [
    ContractCase("head-caching", lambda: HeadCaching(), tiny_gpt2, _data, HF),
    ContractCase("head-patching", lambda: HeadPatching([(0, 1), (1, 0)]), tiny_gpt2, _data, HF),
    ContractCase("head-ablation", lambda: HeadAblation([(1, 1)], mode="mean"), tiny_gpt2, _data, HF),
    ContractCase(
        "attribution-patching",
        lambda: AttributionPatching(lambda logits: logits[:, -1, 0] - logits[:, -1, 1]),
        tiny_gpt2,
        _data,
        HF,
    ),
    ContractCase("logit-lens", lambda: LogitLens(position=-1), tiny_gpt2, _data, HF),
]
