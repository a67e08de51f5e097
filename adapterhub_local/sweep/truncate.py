"""SVD truncation of a LoRA adapter to a lower (or any) rank, registered as a child of its parent.

Per module ``ΔW = scale · B @ A = U S Vᵀ``; the rank-``K`` truncation ``U_K S_K V_Kᵀ`` is the best rank-``K``
approximation (Eckart–Young). The singular values are split evenly between the new factors so that the new
adapter's own scale reproduces it exactly::

    A' = diag(sqrt(S_K / scale')) V_Kᵀ      [K, d_in]
    B' = U_K diag(sqrt(S_K / scale'))       [d_out, K]      ⇒  scale' · B' @ A' = U_K S_K V_Kᵀ

with ``scale' = alpha / K`` (or ``alpha / sqrt(K)`` for rsLoRA) from the parent's ``lora_alpha``, kept
unchanged so the PEFT config stays what PEFT would write for rank ``K``. Where ``K`` exceeds the number of
singular values a module has (``min(d_out, d_in)``) the extra rows/columns are zero.

:func:`truncate_and_register` refuses ``K ≥ r`` (the adapter's rank): that is no truncation, and registering it
as rank ``K`` would claim capacity it does not have. :func:`truncate_tensors` itself accepts ``K = r`` (an exact
re-factorisation, used to check the method).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.lora import PEFT_PREFIX, lora_pairs, lora_scale
from adapterhub_local.registry.cards import AdapterCard, CardInfo
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_tensors
from adapterhub_local.registry.store import LoadedAdapter, Registry
from adapterhub_local.sweep.analysis import factored_svd


@dataclass
class Truncation:
    """A truncated adapter in memory, before it is written anywhere."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    from_rank: int
    to_rank: int
    energy_kept: dict[str, float] = field(default_factory=dict)
    """Per module: the fraction of ``||ΔW||_F²`` the truncation keeps."""

    @property
    def mean_energy_kept(self) -> float:
        values = list(self.energy_kept.values())
        return sum(values) / len(values) if values else 1.0


def truncate_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], rank: int) -> Truncation:
    """Truncate every LoRA module of a PEFT state dict to ``rank``; other tensors (a saved head) are copied."""
    if rank < 1:
        raise UnsupportedError(f"cannot truncate to rank {rank}", "give a rank of at least 1")
    if config.get("use_dora"):
        raise UnsupportedError("DoRA adapters cannot be SVD-truncated: each magnitude was trained for the norm of "
                               "W + ΔW with the full-rank ΔW, so a truncated ΔW would be rescaled by the wrong factor",
                               "truncate a plain LoRA adapter, or retrain DoRA at the smaller rank")
    if any(k.endswith((".lora_embedding_A", ".lora_embedding_B")) for k in tensors):
        raise UnsupportedError("SVD truncation covers LoRA on linear layers; this adapter also has an embedding LoRA",
                               "retrain at the smaller rank (trainable tokens and modules_to_save copies are kept)")
    if config.get("lora_bias"):
        raise UnsupportedError("adapters with a LoRA bias cannot be SVD-truncated", "truncate a plain LoRA adapter")
    pairs = lora_pairs(tensors, config)
    if not pairs:
        raise UnsupportedError("the adapter holds no LoRA modules", "truncate a LoRA adapter")
    use_rslora = bool(config.get("use_rslora", False))
    out: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    for key, value in tensors.items():
        if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            out[key] = value.clone()
    for module, pair in pairs.items():
        # The module's own alpha (alpha_pattern honoured by lora_pairs), recovered from its scale.
        alpha = pair.scale * (math.sqrt(pair.rank) if use_rslora else pair.rank)
        new_scale = lora_scale(alpha, rank, use_rslora)
        u, s, vh = factored_svd(pair.a, pair.b, pair.scale)
        k = min(rank, s.numel(), pair.rank)
        root = (s[:k] / new_scale).sqrt()  # [k]
        a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
        b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
        a[:k] = root[:, None] * vh[:k]
        b[:, :k] = u[:, :k] * root[None, :]
        total = float((s**2).sum())
        energy[module] = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
        prefix = PEFT_PREFIX + module if _has_prefix(tensors) else module
        out[f"{prefix}.lora_A.weight"] = a.to(pair.a.dtype).contiguous()
        out[f"{prefix}.lora_B.weight"] = b.to(pair.b.dtype).contiguous()
    new_config = dict(config)
    new_config["r"] = rank
    # A rank pattern would override r per module and break the rank-K promise; alphas stay as they were.
    new_config["rank_pattern"] = {}
    return Truncation(out, new_config, from_rank=max(p.rank for p in pairs.values()), to_rank=rank,
                      energy_kept=energy)


def _has_prefix(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(PEFT_PREFIX) for k in tensors)


def write_peft_dir(tensors: dict[str, torch.Tensor], config: dict[str, Any], directory: Path) -> Path:
    """Write a PEFT adapter directory (safetensors + ``adapter_config.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return directory


def truncated_name(parent: AdapterCard, rank: int) -> str:
    """Default name of a truncation: ``<parent name>-trunc-r<K>``."""
    return f"{parent.name}-trunc-r{rank}"


def truncate_and_register(
    registry: Registry,
    ref: str,
    rank: int,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> AdapterCard:
    """Truncate the adapter ``ref`` to ``rank`` and register it with ``parent`` = that exact version."""
    loaded: LoadedAdapter = registry.load_adapter(ref)
    parent = loaded.card
    if parent.kind != "lora":
        raise UnsupportedError(f"{parent.ref} is a {parent.kind} adapter", "truncate a LoRA adapter")
    pairs = lora_pairs(loaded.tensors, dict(loaded.config))
    source_rank = max((p.rank for p in pairs.values()), default=parent.rank or 0)
    if pairs and rank >= source_rank:
        raise UnsupportedError(
            f"cannot truncate {parent.ref} (rank {source_rank}) to rank {rank}: truncation only lowers the rank",
            f"give --rank below {source_rank}" + (f" (1 … {source_rank - 1})" if source_rank > 1 else ""))
    result = truncate_tensors(loaded.tensors, dict(loaded.config), rank)
    info = CardInfo(
        task=parent.task, task_type=parent.task_type, recipe=parent.recipe,
        dataset_fingerprint=parent.dataset_fingerprint, metrics=dict(metrics or {}), parent=parent.ref,
        labels=parent.labels,
        extra={
            **{k: v for k, v in parent.extra.items() if k not in ("truncation", "sweep")},
            **(extra or {}),
            "truncation": {
                "method": "svd", "from": parent.ref, "from_rank": result.from_rank, "to_rank": rank,
                "energy_kept_mean": _round(result.mean_energy_kept),
                "energy_kept_min": _round(min(result.energy_kept.values(), default=1.0)),
            },
        },
    )
    with tempfile.TemporaryDirectory(prefix="adapterhub-trunc-") as tmp:
        directory = write_peft_dir(result.tensors, result.config, Path(tmp) / "adapter")
        return registry.register_adapter(name or truncated_name(parent, rank), directory, parent.base, info)


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value
