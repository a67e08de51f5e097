"""What every run of one recipe shares — base, tokenizer, encoded splits, the periodic and final evaluation — and
the runner's seeded model construction, for adapters made outside a plain run (jointly trained by a concurrent
sweep, SVD-truncated, decoded with beam search): the same set-up and the same measurements as
``train/runner.py``, so every row of a sweep report is measured alike. Callers outside ``train/`` reach this
through :mod:`adapterhub_local.train.unit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adapterhub_local import runtime
from adapterhub_local.config import Recipe
from adapterhub_local.models import load_tokenizer
from adapterhub_local.registry.bases import BaseRecord
from adapterhub_local.registry.store import Registry
from adapterhub_local.train import evaluate as ev
from adapterhub_local.train import runner, tasks
from adapterhub_local.train.checks import PreparedData
from adapterhub_local.train.methods import Trainable, default_targets, head_module


def set_labels(model: torch.nn.Module, labels: list[str] | None) -> None:
    """Label names on a classifier's config, as the runner sets them."""
    if labels:
        config: Any = model.config
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}


def build_trainable(recipe: Recipe, record: BaseRecord, labels: list[str] | None) -> Trainable:
    """The runner's set-up of a run, in its order (seed, tokenizer, base, labels, method), so the PEFT
    model — and its random initial adapter — is exactly the one a sequential run starts from."""
    runner.seed_everything(recipe.train.seed)
    load_tokenizer(record)
    model = runner.load_model(recipe, record, len(labels) if labels else None)
    set_labels(model, labels)
    return runner.make_trainable(recipe, record, model, labels)


@dataclass
class RunContext:
    """What every run of one recipe shares: base, tokenizer, encoded splits and the evaluation functions."""

    recipe: Recipe
    record: BaseRecord
    tokenizer: Any
    pad_id: int
    labels: list[str] | None
    encoded: Any
    """The runner's encoded splits (train / validation / test / prompts)."""
    periodic: Callable[[torch.nn.Module], dict[str, Any]]
    collate: Callable[[Any], tasks.Batch]
    metric: str
    greater_is_better: bool


def run_context(registry: Registry, recipe: Recipe, data: PreparedData) -> RunContext:
    """Build the shared context exactly as ``runner.run`` does for its own run."""
    record = runner.ensure_base(registry, recipe)
    tokenizer = load_tokenizer(record)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    classification = recipe.task.type == "classification"
    labels = data.labels if classification else None
    encoded = runner.encode_splits(recipe, data, tokenizer)
    bs = recipe.eval.batch_size
    if labels is not None:
        known = labels

        def periodic(m: torch.nn.Module) -> dict[str, Any]:
            result, _ = ev.classification_eval(m, encoded.validation, known, bs, pad_id)
            return {k: v for k, v in result.items() if k != "confusion_matrix"}

        def collate(ex: Any) -> tasks.Batch:
            return tasks.collate_classification(ex, pad_id)

        metric, greater = recipe.train.metric_for_best or "accuracy", True
    else:
        def periodic(m: torch.nn.Module) -> dict[str, Any]:
            return dict(ev.loss_eval(m, encoded.validation, bs, pad_id))

        def collate(ex: Any) -> tasks.Batch:
            return tasks.collate_generation(ex, pad_id)

        metric = recipe.train.metric_for_best or "val_loss"
        greater = metric not in ("val_loss", "perplexity")
    return RunContext(recipe, record, tokenizer, pad_id, labels, encoded, periodic, collate, metric, greater)


def base_model(ctx: RunContext) -> torch.nn.Module:
    """A fresh copy of the recipe's base as the runner loads it (labels set), with no method applied."""
    model = runner.load_model(ctx.recipe, ctx.record, len(ctx.labels) if ctx.labels else None)
    set_labels(model, ctx.labels)
    return model


def adapter_layout(ctx: RunContext, model: torch.nn.Module) -> tuple[list[str], str | None]:
    """``(target module names, classifier head attribute or None)`` of the recipe's LoRA on ``model``."""
    targets = list(ctx.recipe.method.target_modules or default_targets(model))
    return targets, head_module(model) if ctx.labels is not None else None


def initial_adapter(ctx: RunContext, recipe: Recipe) -> tuple[dict[str, torch.Tensor], int]:
    """``(PEFT state, trainable parameter count)`` of the adapter a run of ``recipe`` starts from (its seed)."""
    from peft.utils.save_and_load import get_peft_model_state_dict

    trainable = build_trainable(recipe, ctx.record, ctx.labels)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainable.model).items()}
    return state, trainable.trainable_params


def trainable_with(ctx: RunContext, recipe: Recipe, state: dict[str, torch.Tensor]) -> Trainable:
    """The runner's PEFT model for ``recipe`` holding the adapter ``state`` (PEFT saved key names)."""
    from peft import set_peft_model_state_dict

    trainable = build_trainable(recipe, ctx.record, ctx.labels)
    set_peft_model_state_dict(trainable.model, state)
    trainable.model.eval()
    return trainable


def evaluate_state(ctx: RunContext, recipe: Recipe, state: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(validation, final test)`` metrics of an adapter, measured as the runner measures its own."""
    trainable = trainable_with(ctx, recipe, state)
    # As the loop evaluates: under the precision the model trained in (a bf16 base meets fp32 trainables).
    with torch.no_grad(), runtime.autocast(recipe.train.precision):
        validation = ctx.periodic(trainable.model)
    final, _ = runner.final_eval(recipe, trainable, ctx.tokenizer, ctx.encoded, ctx.labels, ctx.pad_id)
    return validation, final


def beam_eval(ctx: RunContext, registry: Registry, ref: str, num_beams: int) -> dict[str, Any]:
    """The test prompts of a registered generation adapter decoded with ``num_beams``-beam search and scored
    like the runner's greedy evaluation (same prompts, references, ``max_new_tokens`` and batch size)."""
    from adapterhub_local.config import parse_recipe
    from adapterhub_local.errors import ConfigError

    loaded = registry.load_adapter(ref)
    recipe, problems = parse_recipe(dict(loaded.card.recipe))
    if problems:
        raise ConfigError(problems, f"re-register {ref} from a valid recipe", what=f"{ref}'s recipe")
    trainable = trainable_with(ctx, recipe, loaded.tensors)
    with runtime.autocast(recipe.train.precision):  # as the runner's greedy evaluation
        result, _ = ev.generation_eval(trainable.model, ctx.tokenizer, ctx.encoded.prompts,
                                       recipe.eval.max_new_tokens, recipe.eval.batch_size, num_beams=num_beams)
    return result
