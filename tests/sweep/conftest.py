"""Fixtures for sweep tests: tiny dropout-free bases *with* a character-level tokenizer (the runner needs one),
small generation / classification data files, and recipes for them."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterhub_local.config import Recipe, parse_recipe
from adapterhub_local.registry import Registry

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *string.printable[:95]]


def save_char_tokenizer(path: Path) -> None:
    """A character-level fast tokenizer (one id per printable ASCII character)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)


def make_tiny_llama_with_tokenizer(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    LlamaForCausalLM(config).save_pretrained(path)
    save_char_tokenizer(path)
    return path


def make_tiny_bert_with_tokenizer(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    save_char_tokenizer(path)
    return path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sweep_registry(tmp_path: Path) -> Registry:
    """A registry with a tiny Llama (``tiny-lm``) and a tiny BERT (``tiny-enc``), both with tokenizers."""
    registry = Registry(tmp_path / "registry")
    registry.add_base("tiny-lm", str(make_tiny_llama_with_tokenizer(tmp_path / "tiny-lm")))
    registry.add_base("tiny-enc", str(make_tiny_bert_with_tokenizer(tmp_path / "tiny-enc")))
    return registry


@pytest.fixture
def gen_data(tmp_path: Path) -> Path:
    names = ["Alimentum", "Aromi", "Bibimbap", "Cotto", "Fitzbillies", "Giraffe", "Loch Fyne", "Strada",
             "Wildwood", "Zizzi"]
    rows = [{"mr": f"name[{n}], food[{f}]", "ref": f"{n} serves {f} food."}
            for n in names for f in ("Chinese", "French", "Italian")]
    return _write_jsonl(tmp_path / "gen.jsonl", rows)


@pytest.fixture
def cls_data(tmp_path: Path) -> Path:
    rows = []
    for i in range(60):
        good = i % 2 == 0
        rows.append({"text": ("a fine warm film " if good else "a dull cold mess ") + str(i),
                     "label": "positive" if good else "negative", "movie": f"m{i % 12}"})
    return _write_jsonl(tmp_path / "cls.jsonl", rows)


def recipe_for(kind: str, data: Path, runs_dir: Path, **train: Any) -> Recipe:
    """A small LoRA recipe on the tiny bases: ``gen`` (E2E-like, causal LM) or ``cls`` (classification)."""
    common = {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "log_every": 100,
                        "seed": 3, "precision": "fp32", **train},  # exactness: not the CPU-dependent `auto`
              "output": {"runs_dir": str(runs_dir)}}
    if kind == "gen":
        raw = {"name": "tgen", "base": "tiny-lm", "task": {"type": "generation"},
               "data": {"train": str(data), "template": "{mr}\n", "completion": "{ref}", "split_by": "mr",
                        "validation_fraction": 0.2, "test_fraction": 0.2, "max_length": 64},
               "eval": {"batch_size": 8, "max_new_tokens": 4, "max_test_examples": 3, "forgetting": False},
               **common}
    else:
        raw = {"name": "tcls", "base": "tiny-enc", "task": {"type": "classification"},
               "data": {"train": str(data), "split_by": "movie", "validation_fraction": 0.2,
                        "test_fraction": 0.2, "max_length": 32},
               "eval": {"batch_size": 16}, **common}
    recipe, problems = parse_recipe(raw)
    assert not problems, problems
    return recipe
