"""Make real PEFT adapters (non-zero LoRA B, random prompt embeddings) on tiny bases, for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def lora_model(base_dir: Path, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 1,
               alpha: int = 8) -> Any:
    """A PeftModel with random (non-identity) LoRA weights on the causal LM in ``base_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.eval()
    return model


def save_lora(base_dir: Path, out: Path, **kwargs: Any) -> Any:
    model = lora_model(base_dir, **kwargs)
    model.save_pretrained(out)
    return model


def prompt_model(base_dir: Path, n_virtual: int = 5, seed: int = 2) -> Any:
    """A PeftModel with prompt tuning (random virtual-token embeddings) on the causal LM in ``base_dir``."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
    with torch.no_grad():
        embedding = model.get_submodule("prompt_encoder.default.embedding")
        assert isinstance(embedding, torch.nn.Embedding)
        embedding.weight.normal_()
    model.eval()
    return model


def save_prompt(base_dir: Path, out: Path, **kwargs: Any) -> Any:
    model = prompt_model(base_dir, **kwargs)
    model.save_pretrained(out)
    return model
