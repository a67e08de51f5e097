"""``adapterhub compare``: registered adapters side by side — their card metrics, each ΔW's spectrum and
effective rank, how each ΔW meets the frozen weight it adapts (amplification, LoRA paper §7.3), and the normalised
subspace similarity φ between every pair, per module (§7.2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.errors import FormatError, NotFoundError, UnsupportedError
from adapterhub_local.lora import dora_delta, lora_pairs
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.store import Registry
from adapterhub_local.sweep.amplification import (
    Amplification,
    default_k,
    module_amplification,
    read_base_weights,
    summarise,
    top_singular_values,
)
from adapterhub_local.sweep.analysis import (
    SIDES,
    Spectrum,
    factored_svd,
    random_baseline,
    similarity_summary,
    spectrum_of_values,
    subspace_similarity,
    svd,
)


@dataclass
class AdapterAnalysis:
    """One adapter: its card and, per LoRA module, the spectrum of ΔW and its top directions."""

    card: AdapterCard
    spectra: dict[str, Spectrum]
    directions: dict[str, torch.Tensor] = field(repr=False)
    amplification: list[Amplification] = field(default_factory=list)
    amplification_note: str | None = None
    """Why there is no amplification (the base's weights could not be read), else ``None``."""

    def summary(self) -> dict[str, Any]:
        spectra = list(self.spectra.values())
        n = max(len(spectra), 1)
        return {
            "ref": self.card.ref, "rank": self.card.rank, "alpha": self.card.alpha, "task": self.card.task,
            # The per-example evaluation record stays on the card; a comparison shows the scores.
            "parent": self.card.parent, "metrics": {k: v for k, v in self.card.metrics.items() if k != "per_example"},
            "trainable_params": self.card.training.get("trainable_params"),
            "entropy_rank_mean": sum(s.entropy_rank for s in spectra) / n,
            "energy_rank_90_mean": sum(s.energy_rank_90 for s in spectra) / n,
            "energy_rank_99_mean": sum(s.energy_rank_99 for s in spectra) / n,
            "numerical_rank_mean": sum(s.numerical_rank for s in spectra) / n,
            "amplification": summarise(self.amplification),
            "amplification_note": self.amplification_note,
        }


@dataclass
class PairSimilarity:
    """φ grids of two adapters for every module both adapt."""

    a: str
    b: str
    grids: dict[str, torch.Tensor] = field(repr=False)
    dims: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        per_module = {m: {**similarity_summary(g), "random_phi_k": random_baseline(self.dims[m], *[min(g.shape)] * 2)}
                      for m, g in self.grids.items()}
        n = max(len(per_module), 1)
        return {
            "a": self.a, "b": self.b,
            "phi_1_mean": sum(v["phi_1"] for v in per_module.values()) / n,
            "phi_k_mean": sum(v["phi_k"] for v in per_module.values()) / n,
            "modules": per_module,
        }


@dataclass
class Comparison:
    adapters: list[AdapterAnalysis]
    pairs: list[PairSimilarity]
    side: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "adapters": [
                {**a.summary(), "modules": {m: s.__dict__ for m, s in a.spectra.items()},
                 "amplification_modules": [row.to_dict() for row in a.amplification]} for a in self.adapters
            ],
            "pairs": [p.summary() for p in self.pairs],
        }


def analyse_adapter(registry: Registry, ref: str, side: str = "right", projection_rank: int | None = None,
                    weight_spectra: dict[tuple[str, str], torch.Tensor] | None = None) -> AdapterAnalysis:
    """Spectra, top directions and amplification (§7.3: ``projection_rank`` directions, default
    :func:`~adapterhub_local.sweep.amplification.default_k`) of every LoRA module of ``ref`` (integrity checked on
    load). ``weight_spectra`` caches the base weights' singular values across adapters of one base.

    A DoRA module's update is not ``scale·B·A``: its magnitude rescales every output feature of ``W + scale·B·A``,
    so its ΔW (``W'`` − ``W``, as a merge computes it) is built from the base weight and analysed densely."""
    if side not in SIDES:
        raise UnsupportedError(f"unknown side {side!r}", f"use one of {', '.join(SIDES)}")
    loaded = registry.load_adapter(ref)
    if loaded.card.kind != "lora":
        raise UnsupportedError(f"{loaded.card.ref} is a {loaded.card.kind} adapter", "compare LoRA adapters")
    config = dict(loaded.config)
    pairs = lora_pairs(loaded.tensors, config)
    weights: dict[str, torch.Tensor] = {}
    note = None
    try:
        weights = _base_weights(registry, loaded.card, sorted(pairs), bool(config.get("fan_in_fan_out")))
    except (FormatError, NotFoundError, OSError) as error:
        note = f"base weights not read: {error}"
    spectra: dict[str, Spectrum] = {}
    dirs: dict[str, torch.Tensor] = {}
    svds: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
    for module, pair in sorted(pairs.items()):
        if pair.magnitude is None:
            u, s, vh = factored_svd(pair.a, pair.b, pair.scale)
        elif module in weights:
            u, s, vh = svd(dora_delta(weights[module], pair))
        else:
            raise UnsupportedError(f"{loaded.card.ref} is a DoRA adapter: its update depends on the base weight, "
                                   f"which could not be read ({note})", f"register its base {loaded.card.base!r}")
        spectra[module] = spectrum_of_values(s)
        keep = spectra[module].numerical_rank  # directions with zero singular value carry no update
        dirs[module] = u[:, :keep] if side == "left" else vh[:keep].T
        svds[module] = (u, s, vh, pair.rank)
    analysis = AdapterAnalysis(loaded.card, spectra, dirs, amplification_note=note)
    cache = {} if weight_spectra is None else weight_spectra
    for module, (u, s, vh, rank) in svds.items() if weights else ():
        weight = weights[module]
        k = min(projection_rank if projection_rank is not None else default_k(rank, *weight.shape), int(s.shape[0]))
        sigma = cache.get((loaded.card.base_fingerprint, module))
        if sigma is None or sigma.shape[0] < min(k, *weight.shape):
            sigma = cache[(loaded.card.base_fingerprint, module)] = top_singular_values(weight, k)
        analysis.amplification.append(module_amplification(module, weight, u, s, vh, k, sigma))
    return analysis


def _base_weights(registry: Registry, card: AdapterCard, modules: list[str],
                  fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    """The frozen weights ``card``'s modules adapt, as ``[d_out, d_in]`` (a GPT-2 ``Conv1D`` weight, stored
    ``[d_in, d_out]``, is transposed), from its registered base (refused if the base has changed)."""
    record = registry.base(card.base)
    if card.base_fingerprint and record.fingerprint != card.base_fingerprint:
        raise FormatError(f"base {card.base!r} is not the one {card.ref} was trained on (fingerprint differs)",
                          "register the original base")
    weights = read_base_weights(record.path, modules)
    return {m: w.T for m, w in weights.items()} if fan_in_fan_out else weights


def pair_similarity(first: AdapterAnalysis, second: AdapterAnalysis) -> PairSimilarity:
    """φ grids for the modules both adapters adapt."""
    if first.card.base_fingerprint != second.card.base_fingerprint:
        raise UnsupportedError(
            f"{first.card.ref} and {second.card.ref} were trained on different bases "
            f"({first.card.base}, {second.card.base})",
            "compare subspaces only between adapters of the same base",
        )
    common = sorted(set(first.directions) & set(second.directions))
    grids = {m: subspace_similarity(first.directions[m], second.directions[m]) for m in common}
    dims = {m: int(first.directions[m].shape[0]) for m in common}
    return PairSimilarity(first.card.ref, second.card.ref, grids, dims)


def compare(registry: Registry, refs: list[str], side: str = "right",
            projection_rank: int | None = None) -> Comparison:
    """Analyse each adapter and every pair (a ref given twice is compared with itself)."""
    if not refs:
        raise UnsupportedError("nothing to compare", "give one or more adapter references")
    weight_spectra: dict[tuple[str, str], torch.Tensor] = {}
    analyses = [analyse_adapter(registry, ref, side, projection_rank, weight_spectra) for ref in refs]
    pairs = [pair_similarity(a, b) for a, b in combinations(analyses, 2)]
    return Comparison(analyses, pairs, side)


def write_comparison(comparison: Comparison, out_dir: Path, max_modules: int = 6) -> list[Path]:
    """``compare.json``, ``compare.md``, one φ heatmap PNG per pair, the amplification per layer and a spectra PNG
    under ``out_dir``."""
    from adapterhub_local.sweep import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "compare.json", out_dir / "compare.md"]
    written[0].write_text(json.dumps(comparison.to_dict(), indent=2, sort_keys=True, default=str), encoding="utf-8")
    written[1].write_text(comparison_markdown(comparison), encoding="utf-8")
    for index, pair in enumerate(comparison.pairs):
        path = out_dir / f"similarity-{index}-{_slug(pair.a)}-vs-{_slug(pair.b)}.png"
        plots.similarity_heatmaps(pair.grids, pair.a, pair.b, path, max_modules=max_modules)
        written.append(path)
    if any(a.amplification for a in comparison.adapters):
        amplification_path = out_dir / "amplification.png"
        plots.amplification_plot({a.card.ref: a.amplification for a in comparison.adapters}, amplification_path)
        written.append(amplification_path)
    spectra_path = out_dir / "spectra.png"
    plots.spectra_plot({a.card.ref: a.spectra for a in comparison.adapters}, spectra_path)
    written.append(spectra_path)
    return written


def _slug(ref: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in ref)


def metric_names(comparison: Comparison) -> list[str]:
    names: set[str] = set()
    for analysis in comparison.adapters:
        names.update(k for k, v in analysis.card.metrics.items() if isinstance(v, int | float))
    return sorted(names)


def comparison_markdown(comparison: Comparison) -> str:
    """The side-by-side table and the pair similarities as markdown."""
    metrics = metric_names(comparison)
    head = ["adapter", "rank", "alpha", *metrics, "entropy rank", "rank@90%", "rank@99%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for analysis in comparison.adapters:
        s = analysis.summary()
        cells = [s["ref"], s["rank"], s["alpha"], *[_fmt(analysis.card.metrics.get(m)) for m in metrics],
                 _fmt(s["entropy_rank_mean"]), _fmt(s["energy_rank_90_mean"]), _fmt(s["energy_rank_99_mean"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if comparison.pairs:
        lines += ["", f"Normalised subspace similarity φ ({comparison.side} singular vectors of ΔW), "
                  "mean over modules; k = the smaller numerical rank.", "",
                  "| a | b | φ(1,1) | φ(k,k) |", "|---|---|---|---|"]
        for pair in comparison.pairs:
            p = pair.summary()
            lines.append(f"| {p['a']} | {p['b']} | {_fmt(p['phi_1_mean'])} | {_fmt(p['phi_k_mean'])} |")
    return "\n".join(lines + amplification_markdown(comparison)) + "\n"


def amplification_markdown(comparison: Comparison) -> list[str]:
    """§7.3's table: per adapter and kind of module, the projections of W onto k directions (mean over layers)."""
    lines = ["", "How ΔW meets the frozen W (LoRA paper §7.3): ‖U_kᵀ W V_k‖_F with U_k, V_k the top-k singular "
             "vectors of ΔW, of W itself, and of random frames (root mean square); amplification = ‖ΔW‖_F / "
             "‖U_kᵀ W V_k‖_F (ΔW's directions). Mean over the layers of each kind of module; the amplification is the "
             "median of the layers' factors.", "",
             "| adapter | module | k | ‖W‖_F | ‖ΔW‖_F | onto ΔW | onto W | onto random | amplification (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for analysis in comparison.adapters:
        if analysis.amplification_note:
            lines.append(f"| {analysis.card.ref} | {analysis.amplification_note} | | | | | | | |")
        for kind, row in summarise(analysis.amplification).items():
            lines.append(f"| {analysis.card.ref} | {kind} | {_fmt(row['k'])} | {_fmt(row['weight_norm'])} | "
                         f"{_fmt(row['delta_norm'])} | {_fmt(row['onto_delta'])} | {_fmt(row['onto_weight'])} | "
                         f"{_fmt(row['onto_random'])} | {_fmt(row['factor'])} |")
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
