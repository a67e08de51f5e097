"""What each task kept: a combined adapter and each of its parents, evaluated on every parent's task.

Each parent's card carries its resolved training recipe; :func:`~adapterhub_local.train.checks.prepare_data`
re-reads that recipe's data and re-makes its split (same files, fractions and seed), so the *held-out test
rows the parent was scored on* are found again (a multi-task recipe gives one task per dataset). Every model —
each parent alone, then the combination — is loaded once and scored on every task with the task's own
templates: the completion loss (mean NLL per completion token, lower is better) and, unless skipped, greedy
generation scored by BLEU / ROUGE-L / exact match. The result is a task × adapter table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterhub_local.compose.lineage import links
from adapterhub_local.config import parse_recipe
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.registry.store import Registry
from adapterhub_local.train import evaluate as ev
from adapterhub_local.train import tasks
from adapterhub_local.train.checks import prepare_data
from adapterhub_local.train.data import Row
from adapterhub_local.train.restore import restore

HEADLINE = ("bleu", "rougeL", "exact_match")
"""Generation metrics kept in the table (the full set is one ``adapterhub eval --data`` away)."""


@dataclass
class Task:
    """One parent task's held-out rows and how they become prompt/completion."""

    name: str
    parent: str
    spec: tasks.TemplateSpec
    rows: list[Row]
    max_length: int
    max_new_tokens: int


@dataclass
class CompositionEval:
    """Scores ``task name → model ref → metric → value`` and what could not be evaluated (with why)."""

    ref: str
    models: list[str]
    tasks: list[Task]
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "models": self.models, "skipped": self.skipped,
                "tasks": [{"task": t.name, "parent": t.parent, "n": len(t.rows), "scores": self.scores.get(t.name, {})}
                          for t in self.tasks]}


def parent_tasks(registry: Registry, ref: str, max_examples: int | None) -> CompositionEval:
    """The combination's parents (those still registered) and their tasks' held-out rows."""
    card = registry.resolve(ref)
    if card.composition is None:
        raise UnsupportedError(f"{card.ref} is not a combination (its card names no parents)",
                               f"evaluate it on a file with `adapterhub eval {card.ref} --data FILE`")
    result = CompositionEval(ref=card.ref, models=[], tasks=[])
    for link in links(registry, card):
        if link.state != "present":
            result.skipped.append(f"parent {link.ref} is {link.state}: its task and its own scores are not shown")
            continue
        parent = registry.resolve(link.ref)
        result.models.append(parent.ref)
        if parent.task_type != "causal_lm" or not parent.recipe:
            why = "it has no training recipe on its card (imported)" if not parent.recipe else "it does not generate"
            result.skipped.append(f"task of {parent.ref}: {why}, so its held-out data is unknown")
            continue
        recipe, _ = parse_recipe(parent.recipe)
        data, problems = prepare_data(recipe)
        if data is None:
            result.skipped.append(f"task of {parent.ref}: its data cannot be read again ({'; '.join(problems[:3])})")
            continue
        for source in data.sources:
            rows = source.splits.test[: max_examples or recipe.eval.max_test_examples or None]
            if source.spec.name not in {t.name for t in result.tasks}:
                result.tasks.append(Task(source.spec.name, parent.ref, source.spec, rows, recipe.data.max_length,
                                         recipe.eval.max_new_tokens))
    result.models.append(card.ref)
    return result


def evaluate_composition(registry: Registry, ref: str, *, max_examples: int | None = None, batch_size: int = 16,
                         max_new_tokens: int | None = None, generate: bool = True) -> CompositionEval:
    """Score each parent and the combination on every parent task (see the module docstring)."""
    result = parent_tasks(registry, ref, max_examples)
    if not result.tasks:
        raise UnsupportedError(f"no parent task of {result.ref} can be evaluated: {'; '.join(result.skipped)}",
                               "evaluate it on a file with `adapterhub eval REF --data FILE`")
    return score(registry, result, batch_size=batch_size, max_new_tokens=max_new_tokens, generate=generate)


def score(registry: Registry, result: CompositionEval, *, batch_size: int = 16, max_new_tokens: int | None = None,
          generate: bool = True) -> CompositionEval:
    """Fill ``result.scores``: every model of ``result.models`` on every task of ``result.tasks``."""
    for model_ref in result.models:
        restored = restore(registry, model_ref)
        for task in result.tasks:
            examples = tasks.encode_generation(task.rows, task.spec, restored.tokenizer, task.max_length)
            scores = {"loss": float(ev.loss_eval(restored.model, examples, batch_size, restored.pad_id)["val_loss"])}
            if generate:
                prompts = tasks.generation_prompts(task.rows, task.spec)
                gen, _ = ev.generation_eval(restored.model, restored.tokenizer, prompts,
                                            max_new_tokens or task.max_new_tokens, batch_size)
                scores.update({k: float(gen[k]) for k in HEADLINE if k in gen})
            result.scores.setdefault(task.name, {})[model_ref] = scores
        del restored  # one model in memory at a time
    return result


def table_rows(result: CompositionEval) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the task × adapter table (each cell: loss, then the generation scores)."""
    columns = ["task (held-out n)", *[m + (" (combined)" if m == result.ref else "") for m in result.models]]
    rows = []
    for task in result.tasks:
        cells = []
        for model in result.models:
            scores = result.scores.get(task.name, {}).get(model, {})
            cells.append(" ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        rows.append([f"{task.name} ({len(task.rows)}, from {task.parent})", *cells])
    return columns, rows
