"""Fixtures for the training runner: a word-level tokenizer saved beside the tiny random models, small
synthetic data sets, and recipes built in the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapterhub_local.config import Recipe, parse_recipe
from adapterhub_local.registry import Registry
from tests.conftest import make_tiny_bert, make_tiny_llama

WORDS = [
    "good", "bad", "great", "awful", "fine", "poor", "movie", "film", "plot", "acting", "was", "is", "the", "a", "very",
    "not", "really", "name", "area", "city", "centre", "riverside", "price", "cheap", "high", "food", "pub",
    "restaurant", "near", "family", "friendly", "yes", "no", "there", "in", "of", "and", "with", "it",
]


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer (< 96 entries, so it fits the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS, ",", "[", "]", "."])}
    assert len(vocab) <= 96
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="</s>")
    fast.save_pretrained(str(path))


def classification_rows(n_movies: int = 12, per_movie: int = 6) -> list[dict[str, Any]]:
    positive = ["good movie", "great film", "very good acting", "fine plot", "really great movie", "good plot"]
    negative = ["bad movie", "awful film", "very poor acting", "not good plot", "really bad movie", "poor plot"]
    rows = []
    for m in range(n_movies):
        for i in range(per_movie):
            label = "positive" if (i + m) % 2 == 0 else "negative"
            text = (positive if label == "positive" else negative)[(i + m) % 6]
            rows.append({"text": text, "label": label, "movie": f"movie{m}"})
    return rows


def generation_rows(n_mr: int = 10, refs: int = 3) -> list[dict[str, Any]]:
    foods = ["pub", "restaurant"]
    areas = ["city centre", "riverside"]
    rows = []
    for i in range(n_mr):
        food, area = foods[i % 2], areas[(i // 2) % 2]
        mr = f"name [ {food} ] , area [ {area} ] , price [ {'cheap' if i % 3 else 'high'} ]"
        for r in range(refs):
            ref = f"there is a {food} in the {area} ." if r % 2 == 0 else f"a {food} near the {area} ."
            rows.append({"mr": mr, "ref": ref, "group": f"mr{i}", "text": ref})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_recipe(raw: dict[str, Any]) -> Recipe:
    recipe, problems = parse_recipe(raw)
    assert not problems, problems
    return recipe


@pytest.fixture
def bert_registry(tmp_path: Path) -> Registry:
    """A registry with a tiny BERT (plus tokenizer) registered as base ``tbert``."""
    directory = make_tiny_bert(tmp_path / "tiny-bert")
    save_tokenizer(directory)
    registry = Registry(tmp_path / "registry")
    registry.add_base("tbert", str(directory))
    return registry


@pytest.fixture
def llama_tok_registry(tmp_path: Path) -> Registry:
    """A registry with a tiny Llama (plus tokenizer) registered as base ``tllama``."""
    directory = make_tiny_llama(tmp_path / "tiny-llama")
    save_tokenizer(directory)
    registry = Registry(tmp_path / "registry")
    registry.add_base("tllama", str(directory))
    return registry


@pytest.fixture
def cls_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "cls.jsonl", classification_rows())


@pytest.fixture
def gen_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "gen.jsonl", generation_rows())


def cls_raw(data: Path, runs: Path, **method: Any) -> dict[str, Any]:
    return {
        "name": "tcls", "base": "tbert",
        "task": {"type": "classification", "labels": ["negative", "positive"]},
        "data": {"train": str(data), "split_by": "movie", "max_length": 16,
                 "validation_fraction": 0.2, "test_fraction": 0.2},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, **method},
        "train": {"lr": 5e-3, "batch_size": 8, "max_steps": 6, "eval_every": 3, "seed": 0, "log_every": 1,
                  "precision": "fp32"},  # exactness tests: not the CPU-dependent `auto` (bf16 on AMX)
        "eval": {"batch_size": 16},
        "output": {"runs_dir": str(runs)},
    }


def gen_raw(data: Path, runs: Path, **method: Any) -> dict[str, Any]:
    return {
        "name": "tgen", "base": "tllama",
        "task": {"type": "generation"},
        "data": {"train": str(data), "split_by": "group", "template": "{mr} :", "completion": " {ref}",
                 "max_length": 48, "validation_fraction": 0.2, "test_fraction": 0.2},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                   **method},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 6, "eval_every": 3, "seed": 0, "log_every": 1,
                  "precision": "fp32"},  # exactness tests: not the CPU-dependent `auto` (bf16 on AMX)
        "eval": {"batch_size": 8, "max_new_tokens": 8, "forgetting_data": str(data), "forgetting_samples": 4},
        "output": {"runs_dir": str(runs)},
    }
