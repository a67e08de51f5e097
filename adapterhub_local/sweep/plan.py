"""Planning a rank sweep: which (rank, seed) points to train, with which alpha, under which names, and which
of them are over-complete (rank above ``min(d_in, d_out)`` of some target module).

Alpha policies (``alpha`` and ``r`` are the recipe's own ``method.alpha`` / ``method.r``):

* ``fixed`` — ``lora_alpha = alpha`` for every rank, so the scale ``alpha / r`` falls as ``r`` grows (what the
  LoRA paper did for its rank table);
* ``proportional`` — ``lora_alpha = alpha · r' / r`` so every rank ``r'`` keeps the recipe's scale ``alpha / r``;
* ``rslora`` — ``lora_alpha = alpha`` with rsLoRA scaling ``alpha / sqrt(r')``.

Data fractions (rank × data size): each fraction ``f`` trains every (rank, seed) on the first
``round(f · n)`` training rows (``data.max_train_examples``), so all fractions share the same validation and
test split and nested subsets of the same training rows.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adapterhub_local.config import Recipe
from adapterhub_local.errors import ConfigError

DEFAULT_RANKS = tuple(2**i for i in range(11))  # 1 … 1024
ALPHA_POLICIES = ("fixed", "proportional", "rslora")
MODES = ("sequential", "concurrent")


@dataclass
class SweepConfig:
    """What to sweep and how (the CLI's options)."""

    ranks: list[int] = field(default_factory=lambda: list(DEFAULT_RANKS))
    alpha_policy: str = "fixed"
    """``fixed`` | ``proportional`` | ``rslora`` (see the module docstring)."""
    seeds: list[int] | None = None
    """Training seeds (default: the recipe's ``train.seed``)."""
    mode: str = "sequential"
    """``sequential`` (one training run per point) or ``concurrent`` (all points in one process)."""
    truncate_from: int | None = None
    """Also build the SVD-truncated curve from the trained adapter of this rank."""
    tolerance: float = 0.01
    """Margin of the knee test, relative to the best score: a rank counts as worse than the best only when its
    deficit exceeds ``tolerance · |best|`` at 95% confidence (:mod:`adapterhub_local.sweep.stats`)."""
    knee_metric: str | None = None
    """Metric the knee is found on (default: accuracy, else BLEU, …, else val_loss)."""
    sweep_id: str | None = None
    """Name of the sweep (default: derived from the recipe and the plan, so a re-run resumes it)."""
    data_fractions: list[float] = field(default_factory=lambda: [1.0])
    """Fractions of the training rows to sweep at (rank × data size); the held-out splits never change."""
    advise: bool = False
    """Rank advisor: train only the highest rank, predict the curve from its SVD truncations."""
    num_beams: int = 1
    """Also evaluate every trained generation adapter with beam search of this width (1: greedy only)."""
    e2e_metrics: bool = True
    """Generation sweeps: add NIST, METEOR and CIDEr (the E2E challenge's metrics) to BLEU and ROUGE-L."""


@dataclass
class SweepPoint:
    """One adapter to train."""

    rank: int
    seed: int
    alpha: float
    use_rslora: bool
    name: str
    """Adapter name in the registry."""
    over_complete: list[str] = field(default_factory=list)
    """Target module kinds (e.g. ``v_proj``) whose ``min(d_in, d_out)`` is below ``rank``."""
    fraction: float = 1.0
    """Fraction of the training rows this point trains on."""
    train_examples: int | None = None
    """``data.max_train_examples`` for this point (None: the recipe's own)."""

    @property
    def key(self) -> str:
        return self.key_of(self.rank, self.seed, self.fraction)

    @staticmethod
    def key_of(rank: int, seed: int, fraction: float = 1.0) -> str:
        """The key of the point at ``(rank, seed, fraction)``: ``r<rank>-s<seed>[-f<fraction>]``."""
        return f"r{rank}-s{seed}" + fraction_suffix(fraction)

    def recipe_for(self, recipe: Recipe, sweep_id: str) -> Recipe:
        """The recipe of this point: rank, alpha, rsLoRA, seed and name set; registration tagged by the sweep."""
        out = copy.deepcopy(recipe)
        out.name = self.name
        out.method.r = self.rank
        out.method.alpha = self.alpha
        out.method.use_rslora = self.use_rslora
        out.train.seed = self.seed
        out.output.tag = sweep_id
        if self.train_examples is not None:
            out.data.max_train_examples = self.train_examples
        return out


def fraction_suffix(fraction: float) -> str:
    """``""`` for the whole training set, else ``-f<fraction>`` (point keys and adapter names)."""
    return "" if fraction == 1.0 else f"-f{fraction:g}"


def parse_fractions(text: str | None) -> list[float]:
    """``"0.1,0.3,1.0"`` → ``[0.1, 0.3, 1.0]``; each in (0, 1]."""
    if not text:
        return [1.0]
    problems: list[str] = []
    out: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            problems.append(f"data fraction {part!r} is not a number")
            continue
        if not 0 < value <= 1:
            problems.append(f"data fraction {part!r} is not in (0, 1]")
        else:
            out.append(value)
    if problems or not out:
        raise ConfigError(problems or ["no data fractions given"], "give fractions like --data-fractions 0.1,0.3,1.0",
                          what="data fractions")
    return sorted(set(out))


@dataclass
class SweepPlan:
    sweep_id: str
    recipe: Recipe
    config: SweepConfig
    points: list[SweepPoint]
    module_dims: dict[str, tuple[int, int]]
    """Target module kind → ``(d_in, d_out)`` in the base."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id, "recipe": self.recipe.to_dict(), "config": self.config.__dict__,
            "points": [p.__dict__ for p in self.points],
            "module_dims": {k: list(v) for k, v in self.module_dims.items()},
        }


def parse_ranks(text: str | None) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]``; ``None``/empty → the default powers of two 1 … 1024."""
    if not text:
        return list(DEFAULT_RANKS)
    problems: list[str] = []
    ranks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            problems.append(f"rank {part!r} is not a positive integer")
        else:
            ranks.append(int(part))
    if problems or not ranks:
        raise ConfigError(problems or ["no ranks given"], "give ranks like --ranks 1,2,4,8", what="ranks")
    return sorted(set(ranks))


def validate(config: SweepConfig, recipe: Recipe) -> None:
    """Raise one :class:`ConfigError` listing every problem with the sweep options."""
    problems: list[str] = []
    if recipe.method.name != "lora":
        problems.append(f"a rank sweep trains LoRA adapters; the recipe's method is {recipe.method.name!r}")
    if config.alpha_policy not in ALPHA_POLICIES:
        problems.append(f"alpha policy {config.alpha_policy!r} is not one of {', '.join(ALPHA_POLICIES)}")
    if config.mode not in MODES:
        problems.append(f"mode {config.mode!r} is not one of {', '.join(MODES)}")
    if any(r < 1 for r in config.ranks) or not config.ranks:
        problems.append(f"ranks {config.ranks}: give one or more ranks >= 1")
    if config.truncate_from is not None and config.truncate_from not in config.ranks:
        problems.append(f"--truncate-from {config.truncate_from} is not one of the swept ranks {config.ranks}")
    if not 0 <= config.tolerance < 1:
        problems.append(f"tolerance {config.tolerance}: must be in [0, 1)")
    if not config.data_fractions or any(not 0 < f <= 1 for f in config.data_fractions):
        problems.append(f"data fractions {config.data_fractions}: each must be in (0, 1]")
    if config.mode == "concurrent" and config.data_fractions != [1.0]:
        problems.append("--data-fractions trains each fraction on its own training rows; use --mode sequential")
    if config.advise and len(config.ranks) < 2:
        problems.append("--advise predicts lower ranks from the highest one; give at least two --ranks")
    if config.num_beams < 1:
        problems.append(f"--num-beams {config.num_beams}: must be at least 1")
    elif config.num_beams > 1 and recipe.task.type == "classification":
        problems.append("--num-beams applies to generation tasks; this recipe is a classifier")
    if problems:
        raise ConfigError(problems, "fix the sweep options", what="sweep")


def point_alpha(recipe: Recipe, rank: int, policy: str) -> tuple[float, bool]:
    """``(lora_alpha, use_rslora)`` of rank ``rank`` under ``policy``."""
    alpha = float(recipe.method.alpha)
    if policy == "proportional":
        return alpha * rank / recipe.method.r, False
    return alpha, policy == "rslora"


def default_sweep_id(recipe: Recipe, config: SweepConfig) -> str:
    """``sweep-<recipe name>-<hash of recipe, ranks, alpha policy, seeds>``: the same command names the same sweep
    (so a re-run resumes it; mode, tolerance and ``--truncate-from`` may differ between runs). The recipe counts
    by its non-default values only, so a new version's new fields (at their defaults) keep the name."""
    identity: dict[str, Any] = {"recipe": recipe.non_default_fields(), "ranks": sorted(config.ranks),
                                "alpha_policy": config.alpha_policy, "seeds": config.seeds}
    if config.data_fractions != [1.0]:
        identity["data_fractions"] = sorted(config.data_fractions)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"sweep-{recipe.name}-{digest}"[:64]


def plan_sweep(recipe: Recipe, config: SweepConfig, module_dims: dict[str, tuple[int, int]],
               train_rows: int | None = None) -> SweepPlan:
    """Every (fraction, seed, rank) point with its alpha, adapter name, over-complete modules and training-row
    cap (``train_rows``: the training set's size, needed for fractions below 1)."""
    validate(config, recipe)
    sweep_id = config.sweep_id or default_sweep_id(recipe, config)
    seeds = config.seeds or [recipe.train.seed]
    fractions = sorted(set(config.data_fractions))
    if fractions != [1.0] and not train_rows:
        raise ConfigError(["--data-fractions needs the training set's size"], "check the recipe's data",
                          what="sweep")
    points = []
    for fraction in fractions:
        cap = None if fraction == 1.0 or train_rows is None else max(1, round(fraction * train_rows))
        for seed in seeds:
            for rank in sorted(set(config.ranks)):
                alpha, rslora = point_alpha(recipe, rank, config.alpha_policy)
                over = sorted(m for m, (d_in, d_out) in module_dims.items() if rank > min(d_in, d_out))
                suffix = f"-r{rank}" + (f"-s{seed}" if len(seeds) > 1 else "") + fraction_suffix(fraction)
                points.append(SweepPoint(rank, seed, alpha, rslora, f"{recipe.name}{suffix}", over, fraction, cap))
    return SweepPlan(sweep_id, recipe, config, points, module_dims)


def target_dims(shapes: Mapping[str, tuple[int, ...]], targets: list[str], fan_in_fan_out: bool = False
                ) -> dict[str, tuple[int, int]]:
    """``(d_in, d_out)`` of each target module kind, read from the base's tensor shapes (the smallest
    ``min(d_in, d_out)`` wins where a kind has several shapes)."""
    out: dict[str, tuple[int, int]] = {}
    for target in targets:
        suffix = f".{target}.weight"
        for name, shape in shapes.items():
            if (name.endswith(suffix) or name == f"{target}.weight") and len(shape) == 2:
                dims = (shape[0], shape[1]) if fan_in_fan_out else (shape[1], shape[0])
                if target not in out or min(dims) < min(out[target]):
                    out[target] = (int(dims[0]), int(dims[1]))
    return out
