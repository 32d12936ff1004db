"""Tiny Hugging Face models built from configs (random init, nothing downloaded) and a tokenizer stand-in."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
import transformers  # the `hf` extra (part of the dev extra, so CI has it)

transformers.logging.set_verbosity_error()

VOCAB = 64


class WordTokenizer:
    """A tokenizer stand-in: one id per word of a fixed vocabulary, built in code."""

    def __init__(self, words: list[str]) -> None:
        self.ids = {w: i for i, w in enumerate(words)}

    def __call__(self, *texts: str) -> torch.Tensor:
        return torch.tensor([[self.ids[w] for w in t.split()] for t in texts])


WORDS = ["the", "cat", "dog", "sat", "on", "mat", "rug", "is", "a", "big", "small", "red", "blue"]
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]


@pytest.fixture
def tokenizer() -> WordTokenizer:
    return WordTokenizer(WORDS)


def gpt2(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def vit(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return transformers.ViTModel(config).eval()


@pytest.fixture
def tiny_gpt2():
    return gpt2()


@pytest.fixture
def tiny_llama():
    return llama()


def ids(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
