"""The LoRA update, defined once: ``ΔW = scale · B @ A`` with ``scale = alpha / r`` (or
``alpha / sqrt(r)`` for rsLoRA). Merge, unmerge, SVD truncation and comparison all call this.

DoRA (``use_dora``) adds a learned magnitude ``m`` (``[d_out]``) per module: the adapted weight is
``W' = (m / ‖W + ΔW‖_row) ⊙ (W + ΔW)``, the norm taken per output feature over the input features and
treated as a constant (PEFT detaches it). :func:`dora_factor` computes ``m / ‖W + ΔW‖`` once per adapter,
so serving scales each output feature of the row's ``W·x + ΔW·x`` and merging scales the weight's rows.

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
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
"""PEFT's key for a module's DoRA magnitude (``base_model.model.<module>.lora_magnitude_vector``, ``[d_out]``)."""


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale · B @ A`` computed in ``dtype`` (fp32 unless asked; ``[d_out, d_in]``)."""
    return (b.to(dtype) @ a.to(dtype)) * scale


@dataclass
class LoraPair:
    """One adapted module: its A/B matrices and effective scale."""

    module: str  # module path without PEFT's prefix, e.g. "model.layers.0.self_attn.q_proj"
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float
    magnitude: torch.Tensor | None = None
    """DoRA: the learned magnitude ``m`` per output feature (``[d_out]``); ``None`` for plain LoRA."""

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        return lora_delta(self.a, self.b, self.scale)


def dora_factor(weight: torch.Tensor, pair: LoraPair, fan_in_fan_out: bool = False,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DoRA's per-output-feature factor ``m / ‖W + scale·B·A‖_row`` in ``dtype`` (fp32 unless asked; ``[d_out]``).

    ``weight`` is the base weight as stored (``[d_out, d_in]``; ``[d_in, d_out]`` for ``Conv1D`` with
    ``fan_in_fan_out``). The norm runs over the input features, as PEFT's ``DoraLinearLayer.get_weight_norm``.
    """
    assert pair.magnitude is not None, "dora_factor needs a DoRA pair"
    dense = weight.to(dtype)
    if fan_in_fan_out:
        dense = dense.T
    delta = lora_delta(pair.a.to(weight.device), pair.b.to(weight.device), pair.scale, dtype)
    norm = torch.linalg.norm(dense + delta, dim=1)  # [d_out]
    return pair.magnitude.to(weight.device, dtype) / norm


def dora_delta(weight: torch.Tensor, pair: LoraPair, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A DoRA module's whole update, as a merge applies it: ``diag(m / ‖W + scale·B·A‖_row) (W + scale·B·A) − W``
    (``weight`` as ``[d_out, d_in]``; float64 unless asked)."""
    w = weight.to(dtype)
    adapted = w + lora_delta(pair.a, pair.b, pair.scale, dtype)
    return dora_factor(weight, pair, dtype=dtype)[:, None] * adapted - w


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
        if key.endswith(MAGNITUDE_SUFFIX):
            module = key[: -len(MAGNITUDE_SUFFIX)]
            module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
            grouped.setdefault(module, {})["magnitude"] = value
            continue
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                module = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
                grouped.setdefault(module, {})[part] = value
    pairs: dict[str, LoraPair] = {}
    use_rslora = bool(config.get("use_rslora", False))
    use_dora = bool(config.get("use_dora", False))
    for module, parts in grouped.items():
        if {"lora_A", "lora_B"} - set(parts):
            raise FormatError(f"module {module!r} lacks lora_A or lora_B", "re-save the adapter with PEFT")
        magnitude = parts.get("magnitude")
        if use_dora != (magnitude is not None):
            what = "has no DoRA magnitude" if use_dora else "has a DoRA magnitude but use_dora is false"
            raise FormatError(f"module {module!r} {what}", "re-save the adapter with PEFT")
        if magnitude is not None and tuple(magnitude.shape) != (int(parts["lora_B"].shape[0]),):
            raise FormatError(f"module {module!r}: DoRA magnitude {list(magnitude.shape)} does not match lora_B "
                              f"{list(parts['lora_B'].shape)}", "re-save the adapter with PEFT")
        rank = int(parts["lora_A"].shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank)))
        pairs[module] = LoraPair(module, parts["lora_A"], parts["lora_B"], lora_scale(alpha, rank, use_rslora),
                                 magnitude)
    return pairs
