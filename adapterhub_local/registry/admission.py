"""The import gate: an adapter enters the registry only if it will load and serve.

:func:`stage_source` copies an untrusted PEFT directory into a private staging directory (regular files
only: symlinks leaving the directory, FIFOs and device files are refused without being read), and
:func:`inspect_version` checks the copies — strict safetensors, floating and finite values, a config of
the right types whose rank matches its tensors, DoRA magnitudes of the right shape and strictly positive
(each scales an output feature's norm), no feature the engine cannot serve, every module and target present
on the base with the right shape. ``verify`` runs the same checks on stored versions, so
import and verify can never disagree about what is admissible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adapterhub_local.errors import FormatError
from adapterhub_local.registry.bases import BaseRecord
from adapterhub_local.registry.cards import CARD_FILE
from adapterhub_local.registry.fingerprint import tensor_shapes
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json, refuse_pickle_dir
from adapterhub_local.registry.peft_config import Problem
from adapterhub_local.registry.peft_dir import AdapterSummary, fit_problems, inspect, magnitude_keys
from adapterhub_local.registry.safefiles import checked_path, copy_regular
from adapterhub_local.registry.safetensors_check import read_layout, value_problems

ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
_DIR_FIX = "a PEFT adapter directory holds adapter_model.safetensors and adapter_config.json"


@dataclass
class Staged:
    """What :func:`stage_source` copied: file name → sha256, and whether a foreign card came along."""

    files: dict[str, str]
    has_card: bool


def stage_source(source: Path, staged: Path) -> Staged:
    """Copy the adapter files (and ``card.json`` if present) of ``source`` into ``staged``."""
    source = Path(source)
    if not source.is_dir():
        raise FormatError(f"{source} is not a directory", "give the path of a PEFT adapter directory")
    root = Path(os.path.realpath(source))
    weights = source / ADAPTER_WEIGHTS
    if not weights.exists() and not weights.is_symlink():
        refuse_pickle_dir(source)
        raise FormatError(f"{source} has no {ADAPTER_WEIGHTS}", _DIR_FIX)
    if not (source / ADAPTER_CONFIG).exists() and not (source / ADAPTER_CONFIG).is_symlink():
        raise FormatError(f"{source} has no {ADAPTER_CONFIG}", _DIR_FIX)
    for name in (*ADAPTER_FILES, CARD_FILE):  # refuse every bad entry before copying any byte
        if (source / name).exists() or (source / name).is_symlink():
            checked_path(source / name, root, follow_inside=True, fix="give a directory holding regular files")
    files = {name: copy_regular(source / name, root, staged / name) for name in ADAPTER_FILES}
    has_card = (source / CARD_FILE).exists()
    if has_card:
        copy_regular(source / CARD_FILE, root, staged / CARD_FILE)
    return Staged(files=files, has_card=has_card)


def inspect_version(directory: Path) -> tuple[AdapterSummary | None, list[Problem]]:
    """Every problem with the adapter files in ``directory`` on their own (no base needed)."""
    directory = Path(directory)
    config = read_json(directory / ADAPTER_CONFIG, "adapter config", "fix adapter_config.json or re-save with PEFT")
    weights = directory / ADAPTER_WEIGHTS
    layout = read_layout(weights)
    summary, problems = inspect(config, layout.tensors())
    values = value_problems(weights, layout)
    problems += [Problem(p, fix="retrain or repair the adapter: weights must be finite floating point")
                 for p in values]
    if summary is not None and not values:
        problems += _magnitude_values(weights, magnitude_keys(summary.tensors))
    return summary, problems


def _magnitude_values(weights: Path, keys: list[str]) -> list[Problem]:
    """DoRA magnitudes must be > 0: a zero or negative one silences or flips an output feature, which no
    training by PEFT produces (it starts at the column norm and divides by it)."""
    if not keys:
        return []
    from safetensors import safe_open

    problems: list[Problem] = []
    with safe_open(str(weights), framework="pt") as handle:
        for key in keys:
            value = handle.get_tensor(key)
            if not value.is_floating_point() or not bool((value > 0).all()):
                problems.append(Problem(f"DoRA magnitude {key!r} holds values <= 0 (min {float(value.min()):.3g})",
                                        fix="retrain or re-export the adapter: magnitudes are positive norms"))
    return problems


def base_fit(summary: AdapterSummary, record: BaseRecord) -> list[Problem]:
    """Problems fitting the adapter onto a registered base (modules, targets, shapes)."""
    return fit_problems(summary, tensor_shapes(record.path), record.hidden_size)


def fitting_bases(summary: AdapterSummary, records: list[BaseRecord]) -> list[BaseRecord]:
    """The registered bases the adapter's tensors fit (to name the right one in an error)."""
    return [r for r in records if not base_fit(summary, r)]
