"""Evaluate a registered version on a data file (``adapterhub eval REF --data FILE``): an adapter, a
head-only classifier or a full fine-tune (``train/restore.py`` loads each kind with its card's pooling).

The card's recipe says how rows become inputs (field mapping, templates, max length); options given
here override it, which is how adapters imported without a recipe are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterhub_local.config import Recipe, parse_recipe
from adapterhub_local.errors import ConfigError
from adapterhub_local.registry import Registry
from adapterhub_local.train import evaluate as ev
from adapterhub_local.train import tasks
from adapterhub_local.train.checks import field_problems, needed_fields
from adapterhub_local.train.data import columns, read_rows, rename
from adapterhub_local.train.restore import restore


@dataclass
class EvalOptions:
    template: str | None = None
    completion: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    max_examples: int | None = None
    batch_size: int = 32
    max_new_tokens: int | None = None


def evaluate_ref(registry: Registry, ref: str, data_path: Path, options: EvalOptions) -> dict[str, Any]:
    """Metrics of version ``ref`` on ``data_path`` (classification or generation, from its card)."""
    card = registry.resolve(ref)
    recipe: Recipe
    recipe, _ = parse_recipe(card.recipe or {})
    d = recipe.data
    generation = card.task_type == "causal_lm"
    spec = tasks.TemplateSpec(options.template or d.template, options.completion or d.completion,
                              options.text_field or d.text_field, options.label_field or d.label_field, name=ref)
    if d.mix and not options.template:
        source = d.mix[0]
        spec = tasks.TemplateSpec(source.template, source.completion, name=ref)
    raw = read_rows(str(data_path), d.format)
    rows = rename(raw, d.fields)
    problems = field_problems(rows, "eval", str(data_path), needed_fields(spec, not generation, None, "eval"),
                               d.fields, columns(raw))
    if generation and (not spec.template or not spec.completion):
        problems.append("generation evaluation needs a prompt template and a completion template")
    labels = card.labels or []
    if not generation:
        outside = sorted({str(r.get(spec.label_field)) for r in rows} - set(labels))
        if outside:
            problems.append(f"labels {outside} are not among the adapter's labels {labels}")
    if problems:
        raise ConfigError(problems, "pass --template/--completion/--text-field/--label-field to match the file",
                          what="evaluation data")
    if options.max_examples:
        rows = rows[: options.max_examples]
    restored = restore(registry, card.ref)
    model, tokenizer, pad_id = restored.model, restored.tokenizer, restored.pad_id
    max_length = d.max_length
    if not generation:
        examples = tasks.encode_classification(rows, spec, tokenizer, labels, max_length)
        result, _ = ev.classification_eval(model, examples, labels, options.batch_size, pad_id)
        return {"ref": card.ref, "n": len(rows), **result}
    examples = tasks.encode_generation(rows, spec, tokenizer, max_length)
    prompts = tasks.generation_prompts(rows, spec)
    out: dict[str, Any] = {"ref": card.ref, **ev.loss_eval(model, examples, options.batch_size, pad_id)}
    gen, _ = ev.generation_eval(model, tokenizer, prompts, options.max_new_tokens or recipe.eval.max_new_tokens,
                                options.batch_size)
    out.update(gen)
    return out
