"""Tasks: rows → tokenized examples → padded (or packed) batches.

* classification — input text (a field or a template) and a label index in the recipe's label order;
* generation — a prompt and a completion, tokenized separately so the loss can be restricted to the
  completion tokens (prompt positions get label -100); optional packing concatenates examples into full
  ``max_length`` rows; several datasets can be mixed, each with its own template and a sampling weight.

:func:`task_spec` turns a trained task's templates and data into the :class:`TaskSpec` its card carries.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adapterhub_local.task_spec import TaskSpec, derive_stops, literal_prefix
from adapterhub_local.train.data import Row, render

IGNORE = -100


@dataclass
class Example:
    """One tokenized example. ``labels`` is a class index (classification) or per-token targets."""

    input_ids: list[int]
    labels: int | list[int]
    source: str = ""


@dataclass
class GenerationPrompt:
    """A distinct prompt of the test set with all its reference completions (BLEU wants them together)."""

    prompt: str
    references: list[str]
    source: str = ""


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]
    real_tokens: int
    """Non-padding tokens in the batch (what tokens/s counts)."""


@dataclass
class TemplateSpec:
    """How one dataset's rows become prompt/completion (or text/label) strings."""

    template: str | None
    completion: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------- classification
def classification_text(row: Row, spec: TemplateSpec) -> str:
    return render(spec.template, row) if spec.template else str(row.get(spec.text_field, ""))


def encode_classification(rows: Sequence[Row], spec: TemplateSpec, tokenizer: Any, labels: Sequence[str],
                          max_length: int) -> list[Example]:
    index = {label: i for i, label in enumerate(labels)}
    texts = [classification_text(r, spec) for r in rows]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [Example(list(ids), index[str(r[spec.label_field])], spec.name)
            for ids, r in zip(encoded, rows, strict=True)]


def collate_classification(examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    labels = torch.tensor([int(e.labels) for e in examples], dtype=torch.long)  # type: ignore[arg-type]
    return Batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum()))


# --------------------------------------------------------------- generation
def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; generation training needs one")
    return int(eos)


def encode_pair(prompt: str, completion: str, tokenizer: Any, max_length: int) -> Example:
    """Prompt tokens (label -100) + completion tokens + EOS (labelled); truncation cuts the completion first,
    then the prompt's start, so the example always ends inside the completion."""
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    c = [*tokenizer(completion, add_special_tokens=False)["input_ids"], eos_id(tokenizer)]
    if len(p) + len(c) > max_length:
        keep_c = max(1, max_length - len(p))
        c = c[:keep_c]
        p = p[-(max_length - len(c)):] if len(p) + len(c) > max_length else p
    return Example(p + c, [IGNORE] * len(p) + c)


def encode_generation(rows: Sequence[Row], spec: TemplateSpec, tokenizer: Any, max_length: int) -> list[Example]:
    assert spec.template is not None and spec.completion is not None
    out = []
    for row in rows:
        example = encode_pair(render(spec.template, row), render(spec.completion, row), tokenizer, max_length)
        example.source = spec.name
        out.append(example)
    return out


def generation_prompts(rows: Sequence[Row], spec: TemplateSpec) -> list[GenerationPrompt]:
    """Distinct prompts (first-seen order) with all their references."""
    assert spec.template is not None and spec.completion is not None
    grouped: dict[str, GenerationPrompt] = {}
    for row in rows:
        prompt = render(spec.template, row)
        entry = grouped.setdefault(prompt, GenerationPrompt(prompt, [], spec.name))
        entry.references.append(render(spec.completion, row))
    return list(grouped.values())


def collate_generation(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right padding; padded positions get label -100 and attention mask 0."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum()))


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate examples (in order) and cut into rows of ``max_length`` tokens. The label of the first
    token of each example is already -100 or a completion token, so no target crosses two examples'
    prompts; attention does span example boundaries inside a row (standard naive packing)."""
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids.extend(e.input_ids)
        labels.extend(e.labels)  # type: ignore[arg-type]
    rows = []
    for start in range(0, len(ids), max_length):
        chunk_labels = labels[start : start + max_length]
        if any(t != IGNORE for t in chunk_labels[1:]):
            rows.append(Example(ids[start : start + max_length], chunk_labels, "packed"))
    return rows


def mix(per_source: dict[str, list[Example]], weights: dict[str, float], seed: int) -> list[Example]:
    """One epoch of a weighted mix: the epoch keeps the total number of examples, and source ``s`` gets
    ``weight_s / sum(weights)`` of it (sampled without replacement while it lasts, then repeated)."""
    total = sum(len(v) for v in per_source.values())
    weight_sum = sum(weights[s] for s in per_source)
    rng = random.Random(seed)
    out: list[Example] = []
    for source in sorted(per_source):
        pool = per_source[source]
        if not pool:
            continue
        want = round(total * weights[source] / weight_sum)
        picked: list[Example] = []
        while len(picked) < want:
            order = list(range(len(pool)))
            rng.shuffle(order)
            picked.extend(pool[i] for i in order[: want - len(picked)])
        out.extend(picked)
    return out



# ----------------------------------------------------------------- the spec
def task_spec(classification: bool, sources: Sequence[tuple[TemplateSpec, Sequence[Row]]],
              labels: Sequence[str] | None, pooling: str | None) -> TaskSpec:
    """The spec an adapter trained on ``sources`` (each: its template spec and training rows) carries.

    Classification: the input template (``None`` = the text field as is), labels and pooling.
    Generation from one dataset: its prompt template, the completion template's literal prefix and the
    stops its completions justify. A mix of datasets has no single template that raw input could fill,
    so its spec has none (input is used as given) and only the stops every dataset agrees on.
    """
    if classification:
        template = sources[0][0].template if sources else None
        return TaskSpec("classification", template, labels=tuple(labels) if labels is not None else None,
                        pooling=pooling)
    stops_per_source = []
    for spec, rows in sources:
        assert spec.template is not None and spec.completion is not None
        stops_per_source.append(derive_stops(spec.template, (render(spec.completion, r) for r in rows)))
    if len(sources) == 1:
        spec = sources[0][0]
        assert spec.completion is not None
        return TaskSpec("generation", spec.template, literal_prefix(spec.completion), tuple(stops_per_source[0]))
    shared = [s for s in stops_per_source[0] if all(s in other for other in stops_per_source[1:])]
    return TaskSpec("generation", None, "", tuple(shared))
