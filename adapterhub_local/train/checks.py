"""Recipe checks that need the data, joined with the static ones into a single error before training.

:func:`load_and_check` is what ``adapterhub train`` calls: it parses the recipe (unknown fields, bad
values, missing files, QLoRA availability), reads the data, checks templates, field mappings, split
fields and labels against it, and raises one :class:`ConfigError` listing every problem found.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_local import assets
from adapterhub_local.config import Recipe, apply_overrides, parse_recipe, read_recipe_file
from adapterhub_local.errors import AdapterHubError, ConfigError
from adapterhub_local.train.data import Splits, columns, fingerprint, load_splits, template_fields
from adapterhub_local.train.tasks import TemplateSpec

FIX = "fix the recipe (or the key=value overrides) and run again"


@dataclass
class SourceData:
    """One dataset of the run (a single one unless ``data.mix`` is used)."""

    name: str
    spec: TemplateSpec
    splits: Splits
    weight: float = 1.0


@dataclass
class PreparedData:
    sources: list[SourceData]
    labels: list[str] | None
    fingerprint: str


def field_problems(rows: list[dict[str, Any]], where: str, path: str, needed: list[tuple[str, str]],
                    mapping: dict[str, str], raw_columns: set[str]) -> list[str]:
    problems = []
    for name, column in mapping.items():
        if column not in raw_columns:
            problems.append(f"{where}.fields: {name!r} maps to column {column!r}, which {path} lacks "
                            f"(columns: {', '.join(sorted(raw_columns))})")
    present = columns(rows)
    for what, name in needed:
        if name not in present:
            problems.append(f"{what} names field {name!r}, which {path} does not have "
                            f"(fields: {', '.join(sorted(present))})")
    return problems


def needed_fields(spec: TemplateSpec, classification: bool, split_by: str | None,
                   where: str) -> list[tuple[str, str]]:
    """(what refers to it, field name) for every field the recipe uses."""
    needed: list[tuple[str, str]] = []
    if spec.template:
        needed += [(f"{where}.template {spec.template!r}", n) for n in template_fields(spec.template)]
    elif classification:
        needed.append((f"{where}.text_field", spec.text_field))
    if spec.completion:
        needed += [(f"{where}.completion {spec.completion!r}", n) for n in template_fields(spec.completion)]
    if classification:
        needed.append((f"{where}.label_field", spec.label_field))
    if split_by:
        needed.append((f"{where}.split_by", split_by))
    return needed


def _raw_columns(ref: str, fmt: str) -> set[str]:
    from adapterhub_local.train.data import read_rows

    return columns(read_rows(ref, fmt))


def prepare_data(recipe: Recipe) -> tuple[PreparedData | None, list[str]]:
    """Read and split the recipe's data; return it (None when unreadable) and every data problem."""
    d = recipe.data
    classification = recipe.task.type == "classification"
    problems: list[str] = []
    sources: list[SourceData] = []
    entries: list[tuple[str, str, str | None, str | None, str, dict[str, str], str | None, TemplateSpec, float]]
    if d.mix:
        entries = [(f"data.mix[{i}]", s.path, None, None, s.format, s.fields, s.split_by,
                    TemplateSpec(s.template, s.completion, name=s.name or Path(s.path).stem.replace("asset:", "")),
                    s.weight) for i, s in enumerate(d.mix)]
    else:
        spec = TemplateSpec(d.template, d.completion, d.text_field, d.label_field, name=recipe.task_name)
        entries = [("data", d.train, d.validation, d.test, d.format, d.fields, d.split_by, spec, 1.0)]
    for where, train, validation, test, fmt, mapping, split_by, spec, weight in entries:
        files = [f for f in (train, validation, test) if f]
        if any(not assets.is_asset(f) and not Path(f).exists() for f in files):
            continue  # already reported by the static checks
        try:
            splits = load_splits(train, validation, test, fmt=fmt, mapping=mapping, split_by=split_by,
                                 validation_fraction=d.validation_fraction, test_fraction=d.test_fraction,
                                 seed=d.split_seed)
        except AdapterHubError as exc:
            problems.append(f"{where}: {exc}")
            continue
        needed = needed_fields(spec, classification, split_by, where)
        for split_name, path in (("train", train), ("validation", validation), ("test", test)):
            if path is None:
                continue
            rows = getattr(splits, split_name)
            if split_name == "train":
                rows = rows + splits.validation + splits.test if not (validation and test) else rows
            problems += field_problems(rows, where, path, needed, mapping, _raw_columns(path, fmt))
        if not splits.train:
            problems.append(f"{where}: no training rows left after splitting")
        sources.append(SourceData(spec.name, spec, splits, weight))
    labels = recipe.task.labels
    if classification and sources and not any("label_field" in p for p in problems):
        source = sources[0]
        found = Counter(str(r.get(source.spec.label_field))
                        for split in (source.splits.train, source.splits.validation, source.splits.test)
                        for r in split)
        if labels is None:
            labels = sorted(found)
            if len(labels) < 2:
                problems.append(f"data: only {len(labels)} distinct label(s) found ({labels}); "
                                "classification needs at least two")
        else:
            outside = {label: n for label, n in found.items() if label not in labels}
            if outside:
                listing = ", ".join(f"{label!r} ({n} rows)" for label, n in sorted(outside.items()))
                problems.append(f"data: label(s) {listing} are outside the label set task.labels = {labels}")
    if problems or not sources:
        return None, problems
    extra = {"recipe_data": recipe.to_dict()["data"], "labels": labels}
    digest = fingerprint(Splits([r for s in sources for r in s.splits.train],
                                [r for s in sources for r in s.splits.validation],
                                [r for s in sources for r in s.splits.test]), extra)
    return PreparedData(sources, labels, digest), problems


def check(recipe: Recipe, problems: list[str] | None = None) -> PreparedData:
    """Static + data problems in one :class:`ConfigError`; the prepared data when there are none."""
    from adapterhub_local.config import static_problems

    found = list(problems) if problems is not None else static_problems(recipe)
    data, data_problems = prepare_data(recipe)
    found += data_problems
    if found or data is None:
        raise ConfigError(found or ["no data could be read"], FIX, what="recipe")
    return data


def load_and_check(path: Path | str, overrides: dict[str, str] | None = None) -> tuple[Recipe, PreparedData]:
    """Parse a recipe file with overrides and check it against its data (one error for all problems)."""
    raw = apply_overrides(read_recipe_file(path), overrides or {})
    recipe, problems = parse_recipe(raw)
    if not recipe.name:
        recipe.name = Path(path).stem
    return recipe, check(recipe, problems)
