"""A registry with a tiny Llama base and two LoRA adapters of different ranks and targets, plus a soft prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub_local.registry import Registry
from tests.peft_factory import save_lora, save_prompt


@pytest.fixture
def composed_registry(llama_registry: Registry, tmp_path: Path) -> Registry:
    """``ta`` (rank 4 on q,v), ``tb`` (rank 2 on q,k), ``tc`` (rank 4 on q,v), ``sp`` (soft prompt)."""
    base = llama_registry.base("tiny").path
    save_lora(base, tmp_path / "ta", rank=4, targets=("q_proj", "v_proj"), seed=1, alpha=8)
    save_lora(base, tmp_path / "tb", rank=2, targets=("q_proj", "k_proj"), seed=3, alpha=6)
    save_lora(base, tmp_path / "tc", rank=4, targets=("q_proj", "v_proj"), seed=5, alpha=4)
    save_prompt(base, tmp_path / "sp", n_virtual=3)
    for name in ("ta", "tb", "tc", "sp"):
        llama_registry.register_adapter(name, tmp_path / name, "tiny")
    return llama_registry
