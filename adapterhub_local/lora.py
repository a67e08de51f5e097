"""The LoRA update, defined once: ``ΔW = scale · B @ A`` with ``scale = alpha / r`` (or
``alpha / sqrt(r)`` for rsLoRA). Merge, unmerge, SVD truncation and comparison all call this.

Shapes: ``A`` is ``[r, d_in]``, ``B`` is ``[d_out, r]``, ``ΔW`` is ``[d_out, d_in]`` like ``nn.Linear.weight``
(transpose it for GPT-2 ``Conv1D`` weights, stored ``[d_in, d_out]``, i.e. PEFT's ``fan_in_fan_out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from adapterhub_local.errors import FormatError

PEFT_PREFIX = "base_model.model."


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · B @ A`` computed in fp32 (``[d_out, d_in]``)."""
    return (b.to(torch.float32) @ a.to(torch.float32)) * scale


@dataclass
class LoraPair:
    """One adapted module: its A/B matrices and effective scale."""

    module: str  # module path without PEFT's prefix, e.g. "model.layers.0.self_attn.q_proj"
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        return lora_delta(self.a, self.b, self.scale)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT's rank_pattern / alpha_pattern keys match a module path by suffix (or regex in newer PEFT);
    # a suffix match covers what PEFT writes.
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def lora_pairs(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, LoraPair]:
    """Group a PEFT LoRA state dict into per-module pairs with each module's own scale
    (``rank_pattern``/``alpha_pattern`` honoured)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
                grouped.setdefault(module, {})[part] = value
    pairs: dict[str, LoraPair] = {}
    use_rslora = bool(config.get("use_rslora", False))
    for module, parts in grouped.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise FormatError(f"module {module!r} lacks lora_A or lora_B", "re-save the adapter with PEFT")
        rank = int(parts["lora_A"].shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
        pairs[module] = LoraPair(module, parts["lora_A"], parts["lora_B"], lora_scale(alpha, rank, use_rslora))
    return pairs
