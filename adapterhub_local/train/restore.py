"""Rebuild a registered result as a ready torch model, whatever its kind: an adapter or head-only classifier
(base + PEFT directory) or a full fine-tune (the stored transformers model), with the pooling its card
records. ``eval`` uses it for every kind; ``predict`` uses it for full fine-tunes, which the multi-adapter
engine cannot host (they replace the base's weights rather than add to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapterhub_local.errors import FormatError
from adapterhub_local.models import load_base_model, load_tokenizer
from adapterhub_local.pooling import RESOLVED, with_pooling
from adapterhub_local.registry import AdapterCard, Registry
from adapterhub_local.registry.model_kinds import KIND_FULL, full_model_dir
from adapterhub_local.train import evaluate as ev
from adapterhub_local.train import tasks


@dataclass
class Restored:
    """A registered result in memory, in eval mode."""

    card: AdapterCard
    model: torch.nn.Module
    tokenizer: Any
    pad_id: int


def card_pooling(card: AdapterCard) -> str:
    """The pooling a classifier's head was trained on (``native`` for cards from before pooling was recorded)."""
    pooling = str((card.extra or {}).get("pooling", "native"))
    if pooling not in RESOLVED:
        raise FormatError(f"{card.ref}: card records unknown pooling {pooling!r}", f"use one of {', '.join(RESOLVED)}")
    return pooling


def _load_full(registry: Registry, card: AdapterCard, classifier: bool, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _, path = full_model_dir(registry, card.ref)
    if not classifier:
        causal: torch.nn.Module = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return causal.to(device)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    if card.labels and int(model.config.num_labels) != len(card.labels):
        raise FormatError(f"{card.ref}: the stored head has {model.config.num_labels} outputs, the card lists "
                          f"{len(card.labels)} labels", "re-register the model with matching labels")
    return with_pooling(model, card_pooling(card)).to(device)


def restore(registry: Registry, ref: str, device: str = "cpu") -> Restored:
    """Load ``ref`` (integrity and base fingerprint checked) as a model ready for evaluation."""
    from peft import PeftModel

    card = registry.resolve(ref)
    record = registry.base(card.base)
    tokenizer = load_tokenizer(record)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    classifier = card.task_type != "causal_lm"
    if card.kind == KIND_FULL:
        model = _load_full(registry, card, classifier, device)
    else:
        _, path = registry.verified_path(card.ref, card.base)
        labels = card.labels or []
        if classifier and not labels:
            raise FormatError(f"{card.ref} is a classifier without labels on its card", "re-register it with labels")
        task_type = "sequence_classification" if classifier else "causal_lm"
        base = load_base_model(record, task_type, len(labels) if classifier else None)
        base = with_pooling(base, card_pooling(card)) if classifier else base
        model = PeftModel.from_pretrained(base, str(path)).to(device)
    model.eval()
    return Restored(card, model, tokenizer, pad_id)


def predict_one(restored: Restored, text: str, max_new_tokens: int) -> dict[str, Any]:
    """One input through a restored model: ``{label, probabilities}`` for classifiers, ``{text}`` for
    generators (the card's recipe template applied to classifier input, greedy decoding for generators)."""
    from adapterhub_local.config import parse_recipe

    card, model = restored.card, restored.model
    recipe, _ = parse_recipe(card.recipe or {})
    if card.task_type == "causal_lm":
        [completion] = ev.generate(model, restored.tokenizer, [text], max_new_tokens, 1)
        return {"text": completion, "adapter": card.ref}
    spec = tasks.TemplateSpec(recipe.data.template, None, recipe.data.text_field)
    row = {recipe.data.text_field: text}
    ids = restored.tokenizer(tasks.classification_text(row, spec), truncation=True,
                             max_length=recipe.data.max_length)["input_ids"]
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device),
                       attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device)).logits[0]
    probs = torch.softmax(logits.float(), -1).tolist()
    labels = card.labels or [f"LABEL_{i}" for i in range(len(probs))]
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "probabilities": dict(zip(labels, probs, strict=True)), "adapter": card.ref}


def predict_full(registry: Registry, ref: str, text: str, max_new_tokens: int = 64,
                 device: str = "cpu") -> dict[str, Any] | None:
    """``predict`` for a full fine-tune; ``None`` when ``ref`` is not one (the engine serves the others)."""
    if registry.resolve(ref).kind != KIND_FULL:
        return None
    return predict_one(restore(registry, ref, device), text, max_new_tokens)
