"""From an HTTP body to an engine :class:`~adapterhub_local.inference.types.Request`, checked one by one
before batching so that one bad request never fails a batch.

* ``model`` → the base (``None``) or an adapter version ``name@N`` made for this base (404, 409, 400).
  Resolutions are kept until ``/admin/registry/reload``, so a name means one version while serving.
* prompt → token ids with the server's own copy of the tokenizer (chat template when the base has one,
  a plain ``role: text`` transcript otherwise); the engine runs exactly these ids.
* length: prompt (+ a soft prompt's virtual tokens) must leave room for at least one new token (413);
  an explicit ``max_tokens`` must fit too (413); a default one is clamped to the room left.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapterhub_local.errors import InvalidNameError, InvalidReferenceError, NotFoundError, UnsupportedError
from adapterhub_local.registry import AdapterCard, BaseRecord, Registry
from adapterhub_local.registry.index import IndexRow
from adapterhub_local.server.errors import PromptTooLongError, unknown_model
from adapterhub_local.server.schemas import ChatMessage, ModelCard

GENERATIVE = (None, "causal_lm")
CLASSIFIER = "sequence_classification"


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to."""

    model: str
    """The name as the client sent it (echoed in responses)."""
    adapter: str | None
    """``name@version``, or None for the bare base."""
    card: AdapterCard | None

    @property
    def virtual_tokens(self) -> int:
        if self.card is None or self.card.kind != "prompt":
            return 0
        return int(self.card.num_virtual_tokens or 0)

    @property
    def task_type(self) -> str | None:
        return None if self.card is None else self.card.task_type


class ModelResolver:
    """Names → targets, against one registry and base."""

    def __init__(self, registry: Registry, base: BaseRecord) -> None:
        self.registry = registry
        self.base = base
        self._cache: dict[str, Target] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str) -> Target:
        """The target for ``name``; raises 404 (unknown), 409 (other base)."""
        if name == self.base.name:
            return Target(model=name, adapter=None, card=None)
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        try:
            card = self.registry.resolve(name)
        except (NotFoundError, InvalidNameError, InvalidReferenceError) as exc:
            raise unknown_model(name, exc) from exc
        self.registry.check_base(card, self.base.name)
        target = Target(model=name, adapter=card.ref, card=card)
        with self._lock:
            self._cache[name] = target
        return target

    def generative(self, name: str) -> Target:
        target = self.resolve(name)
        if target.task_type not in GENERATIVE:
            raise UnsupportedError(f"adapter {target.adapter} is a {target.task_type} adapter, it does not generate",
                                   "send it to /v1/classify")
        return target

    def classifier(self, name: str) -> Target:
        target = self.resolve(name)
        if target.task_type != CLASSIFIER:
            what = "the base model" if target.card is None else f"adapter {target.adapter} ({target.task_type})"
            raise UnsupportedError(f"{what} is not a classifier", "classify with a sequence_classification adapter")
        return target

    def reload(self) -> int:
        """Forget every resolution and reconcile the index with the disk; returns the adapter versions seen."""
        with self._lock:
            self._cache.clear()
        return len(self.registry.list_adapters())

    def models(self, created: int, loaded: set[str]) -> list[ModelCard]:
        """The base, then every adapter made for it: each bare name (latest) and each ``name@N``."""
        cards = [ModelCard(id=self.base.name, created=created, root=self.base.name, kind="base", loaded=True)]
        rows = [r for r in self.registry.list_adapters() if r.base_fingerprint == self.base.fingerprint]
        latest: dict[str, IndexRow] = {}
        for row in rows:
            if row.name not in latest or row.version > latest[row.name].version:
                latest[row.name] = row
        for name, row in sorted(latest.items()):
            cards.append(ModelCard(id=name, created=_epoch(row.created, created), root=row.ref, parent=self.base.name,
                                   kind="alias", loaded=row.ref in loaded))
        for row in sorted(rows, key=lambda r: (r.name, r.version)):
            cards.append(ModelCard(id=row.ref, created=_epoch(row.created, created), root=row.ref,
                                   parent=self.base.name, kind=row.kind, loaded=row.ref in loaded))
        return cards


def _epoch(iso: str, default: int) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return default


class PromptBuilder:
    """Tokenizes prompts the way the engine will run them and enforces the context length."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        # A private copy: fast tokenizers are not safe to share with the engine thread.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.context_length = int(context_length)
        self._lock = threading.Lock()

    def text_ids(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text)["input_ids"])

    def chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        turns = [{"role": m.role, "content": m.text} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            with self._lock:
                ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        transcript = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
        return self.text_ids(transcript)

    def budget(self, prompt_tokens: int, target: Target, requested: int | None, default: int) -> int:
        """New tokens this request may generate; raises 413 when the prompt or the request does not fit."""
        used = prompt_tokens + target.virtual_tokens
        room = self.context_length - used
        if room < 1:
            raise PromptTooLongError(
                f"the prompt is {prompt_tokens} tokens (+{target.virtual_tokens} virtual) and the context of "
                f"this base is {self.context_length} tokens",
                f"shorten the prompt to at most {self.context_length - target.virtual_tokens - 1} tokens",
            )
        if requested is not None and requested > room:
            raise PromptTooLongError(
                f"the prompt uses {used} of {self.context_length} context tokens; max_tokens={requested} "
                f"does not fit", f"ask for at most {room} tokens or shorten the prompt")
        return requested if requested is not None else min(default, room)
