"""Merge mode: add ``scale·B·A`` (fp32, from :mod:`adapterhub_local.lora`) into the base weights — for DoRA,
``W' = f ⊙ (W + scale·B·A)`` row-wise with ``f = m / ‖W + scale·B·A‖`` — and take it out again bit for bit.

``W + ΔW - ΔW`` is not ``W`` in floating point, so :class:`Merger` keeps a copy of every weight it
touches and unmerging copies those bytes back. :func:`export_merged` writes a standalone merged model
(safetensors) that plain transformers loads.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference.adapters import PreparedAdapter, prepare
from adapterhub_local.inference.multi_lora import weight_of
from adapterhub_local.lora import dora_factor, lora_delta
from adapterhub_local.registry.store import Registry

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                    "generation_config.json")


def base_module(model: nn.Module, name: str) -> nn.Module:
    """The base module at ``name`` (through a multi-adapter wrapper if there is one)."""
    module = model.get_submodule(name)
    inner = getattr(module, "base", None)
    return inner if isinstance(inner, nn.Module) and _is_wrapper(module) else module


def set_base_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` where the base module at ``name`` is (inside its wrapper if it has one)."""
    module = model.get_submodule(name)
    if _is_wrapper(module):
        module.base = replacement
        return
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _is_wrapper(module: nn.Module) -> bool:
    from adapterhub_local.inference.multi_embedding import MultiEmbedding
    from adapterhub_local.inference.multi_lora import MultiLoraLinear

    return isinstance(module, MultiLoraLinear | MultiEmbedding)


def refuse_prompt(adapter: PreparedAdapter) -> None:
    """Soft prompts change the input, not the weights: there is nothing to merge."""
    if adapter.kind == "prompt":
        raise UnsupportedError(
            f"adapter {adapter.ref} is a soft prompt (prompt tuning); it has no weights to merge",
            "serve it in swap mode (mode='swap' or 'auto'), which prepends its virtual tokens per request")


def merged_weight(weight: torch.Tensor, adapter: PreparedAdapter, name: str) -> torch.Tensor:
    """``W + ΔW`` computed in fp32 and cast back to ``W``'s dtype (``ΔW`` transposed for ``Conv1D``)."""
    pair = adapter.pairs[name]
    # on the weight's device (a GPU computes B·A for a 2048² weight in microseconds, a CPU in milliseconds)
    delta = lora_delta(pair.a.to(weight.device), pair.b.to(weight.device), pair.scale)
    if adapter.fan_in_fan_out:
        delta = delta.T
    merged = weight.to(torch.float32) + delta
    if pair.magnitude is not None:  # DoRA: scale each output feature (a row; a column of a Conv1D weight)
        factor = dora_factor(weight, pair, adapter.fan_in_fan_out)
        merged = merged * (factor[None, :] if adapter.fan_in_fan_out else factor[:, None])
    return merged.to(weight.dtype)


class Merger:
    """Merges one adapter at a time into a model's weights, keeping the originals for an exact unmerge."""

    def __init__(self, model: Any, keep_on: torch.device | None = None,
                 on_swap: Callable[[], None] | None = None) -> None:
        self.model = model
        self.keep_on = keep_on
        self.merged: PreparedAdapter | None = None
        self._originals: dict[str, torch.Tensor] = {}
        self._swapped: dict[str, nn.Module] = {}  # module name -> the original module object
        self.on_swap = on_swap
        """Called when modules were replaced (merge or unmerge of an embedding LoRA or a module copy): a captured
        CUDA graph read the old modules' memory and must be captured again."""
        self.merges = 0
        """Merges done (a re-merge of the adapter already merged is not counted)."""

    @property
    def merged_ref(self) -> str | None:
        return None if self.merged is None else self.merged.ref

    def clean_weight(self, name: str) -> torch.Tensor:
        """The weight at ``name`` as it is without any merged adapter (its kept original while merged)."""
        original = self._originals.get(name)
        return weight_of(base_module(self.model, name)) if original is None else original

    @torch.no_grad()
    def merge(self, adapter: PreparedAdapter) -> None:
        """Merge ``adapter`` (unmerging whatever was merged before)."""
        refuse_prompt(adapter)
        if self.merged is not None and self.merged.ref == adapter.ref:
            return
        self.unmerge()
        for name in adapter.pairs:
            weight = weight_of(base_module(self.model, name))
            self._originals[name] = weight.detach().to(self.keep_on or weight.device, copy=True)
            weight.copy_(merged_weight(weight, adapter, name))
        self._merge_extras(adapter)
        self.merged = adapter
        self.merges += 1

    def _merge_extras(self, adapter: PreparedAdapter) -> None:
        """Embedding LoRA and module copies replace the module (the original object is kept: tied weights stay
        untouched, as PEFT leaves them); trainable tokens overwrite their rows in place (on a tied embedding PEFT
        changes the LM head's rows too, which the shared weight does)."""
        extras = adapter.extras
        for name, pair in extras.embeddings.items():
            original = base_module(self.model, name)
            weight = weight_of(original)
            replacement = copy.deepcopy(original)
            weight_of(replacement).copy_((weight.to(torch.float32) + lora_delta(
                pair.a.to(weight.device), pair.b.to(weight.device), pair.scale).T).to(weight.dtype))
            self._swap(name, replacement)
        for name, params in extras.copies.items():
            replacement = copy.deepcopy(base_module(self.model, name))
            own = dict(replacement.named_parameters())
            for param, value in params.items():
                own[param].copy_(value.to(own[param].device, own[param].dtype))
            self._swap(name, replacement)
        for name, tokens in extras.tokens.items():
            weight = weight_of(base_module(self.model, name))
            self._originals[name] = weight.detach().to(self.keep_on or weight.device, copy=True)
            weight.index_copy_(0, tokens.ids.to(weight.device), tokens.rows.to(weight.device, weight.dtype))
        if (extras.embeddings or extras.copies) and self.on_swap is not None:
            self.on_swap()

    def _swap(self, name: str, replacement: nn.Module) -> None:
        self._swapped.setdefault(name, base_module(self.model, name))
        set_base_module(self.model, name, replacement)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore every touched weight to its exact original bytes."""
        for name, original in self._originals.items():
            weight_of(base_module(self.model, name)).copy_(original)
        self._originals.clear()
        for name, module in self._swapped.items():
            set_base_module(self.model, name, module)
        if self._swapped and self.on_swap is not None:
            self.on_swap()
        self._swapped.clear()
        self.merged = None


def export_merged(registry: Registry, ref: str, out: Path, base: str | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write ``ref`` merged into its base as a plain transformers model directory (safetensors).

    Causal-LM adapters become an ``…ForCausalLM``; classifier adapters an ``…ForSequenceClassification``
    with the adapter's head and labels.
    """
    from adapterhub_local.models import load_base_model

    card = registry.resolve(ref)
    record = registry.base(base or card.base)
    loaded = registry.load_adapter(card.ref, base=record.name)
    if str(loaded.config.get("peft_type", "LORA")).upper() == "PROMPT_TUNING":
        raise UnsupportedError(f"adapter {card.ref} is a soft prompt; it has no weights to merge",
                               "serve it with `adapterhub generate` (swap mode) instead of exporting a merged model")
    classifier = card.task_type == "sequence_classification"
    labels = list(card.labels or [])
    model: Any = load_base_model(record, "sequence_classification" if classifier else "causal_lm",
                            num_labels=len(labels) or None, dtype=dtype)
    adapter = prepare(loaded, model, dtype)
    with torch.no_grad():
        Merger(model).merge(adapter)  # the exported model keeps the merged weights (never unmerged)
        if classifier:
            head = adapter.head
            if head is None:
                raise UnsupportedError(f"classifier adapter {card.ref} carries no head", "retrain it with "
                                       "modules_to_save=[the head]")
            module: Any = model.get_submodule(_head_name(model))
            module.weight.copy_(head.weight)
            if head.bias is not None and getattr(module, "bias", None) is not None:
                module.bias.copy_(head.bias)
            model.config.id2label = dict(enumerate(head.labels))
            model.config.label2id = {label: i for i, label in enumerate(head.labels)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (record.path / name).exists():
            shutil.copy2(record.path / name, out / name)
    return out


def _head_name(model: nn.Module) -> str:
    names = {n for n, _ in model.named_modules()}
    for candidate in ("classifier", "score"):
        if candidate in names:
            return candidate
    raise UnsupportedError(f"{type(model).__name__} has no classifier/score head", "use a BERT-style or decoder base")
