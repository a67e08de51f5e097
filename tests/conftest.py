"""Shared fixtures: tiny random-weight base models saved as HF directories, and an empty registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local.registry import BaseRecord, Registry


def make_tiny_llama(path: Path, seed: int = 0, hidden: int = 32, vocab: int = 96) -> Path:
    """Save a 2-layer Llama with random weights (and no tokenizer) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_tiny_bert(path: Path, seed: int = 0) -> Path:
    """Save a 2-layer BERT encoder with random weights to ``path``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_bert_dir(tmp_path: Path) -> Path:
    return make_tiny_bert(tmp_path / "tiny-bert")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def llama_registry(registry: Registry, tiny_llama_dir: Path) -> Registry:
    """A registry with the tiny Llama registered as base ``tiny``."""
    registry.add_base("tiny", str(tiny_llama_dir))
    return registry


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> BaseRecord:
    """The real SmolLM2-135M-Instruct GGUF, converted once per test session through ``add_base``.

    Tests that need it in their own registry register ``str(smollm2_base.path)`` (a local copy: seconds,
    instead of dequantizing the GGUF again)."""
    from adapterhub_local.assets import smollm2_gguf

    return Registry(tmp_path_factory.mktemp("smollm2-registry")).add_base("smollm2", str(smollm2_gguf()))
