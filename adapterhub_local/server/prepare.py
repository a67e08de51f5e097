"""From an HTTP body to an engine :class:`~adapterhub_local.inference.types.Request`, checked one by one
before batching so that one bad request never fails a batch.

* ``model`` → the base (``None``) or an adapter version ``name@N`` made for this base (404, 409, 400), or a
  composition ``task-a*0.7+style-b@2*0.3`` (:mod:`adapterhub_local.compose.spec`): each part resolves as a
  plain ``model`` would (same cache, same 404/409), then the whole is checked (LoRA only, no head, one task
  type; bad syntax or weights 422, a soft prompt 400) and sent to the engine as ``name@N*w+…``. Compositions
  are not cached here (their spellings are unbounded); their metric label is ``composition``.
  Only canonical spellings resolve (``name``, ``name@N``, ``name:tag``, ``sha256:<lowercase hex>``; no
  whitespace, no ``name@01``), so the names the server answers to — and the metric labels derived from
  them — are bounded by the registry. Resolutions are kept until ``/admin/registry/reload``, so a name
  means one version while serving.
* prompt → token ids with the server's own copy of the tokenizer (chat template when the base has one,
  a plain ``role: text`` transcript otherwise); the engine runs exactly these ids. A prompt whose length in
  characters already proves it cannot fit the context (every token covers at most ``max_token_chars``
  characters) is refused before it is tokenized, so a huge prompt costs nothing but its bytes. The
  routes call the tokenizer off the event loop.
* task: an adapter's card carries its task spec (:mod:`adapterhub_local.task_spec`): the prompt template it
  was trained with, the completion prefix and stop strings. Unless the request says ``"raw": true``, the
  prompt (for chat: the last user message) fills the template, the spec's stops join the request's, and the
  prefix is stripped from the answer — the adapter is served the way it was trained.
* length: prompt (+ a soft prompt's virtual tokens) must leave room for at least one new token (413);
  an explicit ``max_tokens`` must fit too (413); a default one is clamped to the room left.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from adapterhub_local.check.sidecar import summary as check_summary
from adapterhub_local.compose.request import resolve_composition
from adapterhub_local.compose.spec import canonical, is_composition, parse_composition
from adapterhub_local.errors import (
    AdapterHubError,
    ConfigError,
    InvalidNameError,
    InvalidReferenceError,
    NotFoundError,
    UnsupportedError,
)
from adapterhub_local.registry import AdapterCard, BaseRecord, Registry
from adapterhub_local.registry.index import IndexRow
from adapterhub_local.server.errors import PromptTooLongError, unknown_model
from adapterhub_local.server.schemas import ChatMessage, ModelCard
from adapterhub_local.task_spec import PrefixStripper, TaskSpec, spec_from_card

GENERATIVE = (None, "causal_lm")
COMPOSITION_LABEL = "composition"
"""The metric label of every composed request (labels stay bounded whatever weights clients send)."""
CLASSIFIER = "sequence_classification"


@dataclass(frozen=True)
class Target:
    """What a request's ``model`` resolved to."""

    model: str
    """The name as the client sent it (echoed in responses)."""
    adapter: str | None
    """``name@version``, or None for the bare base."""
    card: AdapterCard | None
    spec: TaskSpec | None = None
    """The adapter's task spec (template, completion prefix, stops), when its card has one."""

    def templated(self, raw: bool) -> bool:
        """Whether a request's input goes through the adapter's template (it has one and ``raw`` is off)."""
        return not raw and self.spec is not None and self.spec.template is not None

    def prompt_text(self, text: str, raw: bool) -> str:
        """The text the model runs: ``text`` filled into the adapter's template unless ``raw`` (422 on an input
        the template cannot take)."""
        if not self.templated(raw):
            return text
        assert self.spec is not None
        try:
            return self.spec.apply_template(text)
        except ConfigError as exc:
            raise ConfigError(exc.problems, 'send the fields the template names, or "raw": true to run the '
                              "prompt as it is", what="prompt") from None

    def stops(self, raw: bool, requested: Sequence[str]) -> list[str]:
        """The request's stop strings plus, unless ``raw``, the adapter's own (each once)."""
        own = () if raw or self.spec is None else self.spec.stop
        return list(dict.fromkeys([*requested, *own]))

    def answer(self, text: str, raw: bool) -> str:
        """The model's text as the answer: the completion prefix dropped and cut at the adapter's stops."""
        return text if raw or self.spec is None else self.spec.clean_output(text)

    def stripper(self, raw: bool) -> PrefixStripper:
        """:meth:`answer` for a stream (only the prefix: the engine already stops at every stop string)."""
        return PrefixStripper("" if raw or self.spec is None else self.spec.completion_prefix)

    def label(self, base: str) -> str:
        """The name metrics count this target under: the base, the adapter ``name@N``, or ``composition``."""
        if self.adapter is not None and is_composition(self.adapter):
            return COMPOSITION_LABEL
        return self.adapter or base

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
        if is_composition(name):
            return self._composition(name)
        if not _plain(name):
            raise unknown_model(name, InvalidReferenceError("it contains whitespace or control characters"))
        try:
            card = self.registry.resolve(name)
        except (NotFoundError, InvalidNameError, InvalidReferenceError) as exc:
            raise unknown_model(name, exc) from exc
        if not _canonical(name, card):
            raise unknown_model(name, InvalidReferenceError(f"it is not a canonical spelling of {card.ref}"))
        self.registry.check_base(card, self.base.name)
        spec = spec_from_card(card.extra, card.recipe, card.labels, where=f"card of {card.ref}")
        target = Target(model=name, adapter=card.ref, card=card, spec=spec)
        with self._lock:
            self._cache[name] = target
        return target

    def _composition(self, name: str) -> Target:
        """A per-request composition: every part resolved like a plain ``model`` (so ``name`` means the version it
        means for plain requests), then the whole checked and described (see the module docstring)."""
        parts = parse_composition(name)
        refs = []
        for part in parts:
            target = self.resolve(part.ref)
            if target.adapter is None:
                raise UnsupportedError(f"{name!r} names the base {part.ref!r}; the base is in every composition",
                                       "compose adapters only")
            refs.append((target.adapter, part.weight))
        composition = resolve_composition(self.registry, canonical(refs), self.base.name)
        card = composition.card
        spec = spec_from_card(card.extra, card.recipe, card.labels, where=f"composition {composition.key}")
        return Target(model=name, adapter=composition.key, card=card, spec=spec)

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
        tasks = {row.ref: self.task_of(row) for row in rows}
        parity = {row.ref: self.parity_of(row) for row in rows}
        for name, row in sorted(latest.items()):
            cards.append(ModelCard(id=name, created=_epoch(row.created, created), root=row.ref, parent=self.base.name,
                                   kind="alias", loaded=row.ref in loaded, task=tasks[row.ref], parity=parity[row.ref]))
        for row in sorted(rows, key=lambda r: (r.name, r.version)):
            cards.append(ModelCard(id=row.ref, created=_epoch(row.created, created), root=row.ref,
                                   parent=self.base.name, kind=row.kind, loaded=row.ref in loaded,
                                   task=tasks[row.ref], parity=parity[row.ref]))
        return cards

    def parity_of(self, row: IndexRow) -> dict[str, Any] | None:
        """The latest parity check of one listed version (None: never checked, or an unreadable card)."""
        try:
            return check_summary(self.registry, self.registry.card_of(row.name, row.version))
        except AdapterHubError:
            return None

    def task_of(self, row: IndexRow) -> dict[str, Any] | None:
        """The task spec of one listed version, as the server applies it (None: none, or an unreadable card —
        which ``verify`` reports and a request for it refuses with the reason)."""
        try:
            card = self.registry.card_of(row.name, row.version)
            spec = spec_from_card(card.extra, card.recipe, card.labels, where=f"card of {card.ref}")
        except AdapterHubError:
            return None
        return None if spec is None else spec.to_dict()


_HEX = frozenset("0123456789abcdef")


def _plain(name: str) -> bool:
    """No whitespace or control characters anywhere (they never belong to a canonical reference)."""
    return name.isprintable() and not any(c.isspace() for c in name)


def _canonical(name: str, card: AdapterCard) -> bool:
    """Whether ``name`` is one of the canonical spellings of a reference to ``card``."""
    if name.startswith("sha256:"):
        prefix = name[len("sha256:"):]
        return bool(prefix) and set(prefix) <= _HEX
    if "@" in name:
        return name == card.ref
    if ":" in name:
        return name.partition(":")[0] == card.name
    return name == card.name


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
        self.max_token_chars = max_token_chars(self.tokenizer)
        """Most characters one token of the vocabulary decodes to (+1 for a leading space a decoder may drop)."""
        self._lock = threading.Lock()

    def refuse_unfittable(self, characters: int) -> None:
        """413 when a prompt of ``characters`` characters needs more tokens than the context holds whatever
        its content (each token covers at most ``max_token_chars`` of them) — checked before tokenizing."""
        floor = math.ceil(characters / self.max_token_chars)
        if floor >= self.context_length:
            raise PromptTooLongError(
                f"the prompt has {characters} characters, so at least {floor} tokens, and the context of this "
                f"base is {self.context_length} tokens",
                f"shorten the prompt to well under {self.context_length * self.max_token_chars} characters")

    def text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` (CPU work: call it off the event loop)."""
        self.refuse_unfittable(len(text))
        with self._lock:
            return list(self.tokenizer(text)["input_ids"])

    def chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a chat (CPU work: call it off the event loop)."""
        turns = [{"role": m.role, "content": m.text} for m in messages]
        self.refuse_unfittable(sum(len(t["content"]) for t in turns))
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


def max_token_chars(tokenizer: Any) -> int:
    """Most characters a single token decodes to, over the whole vocabulary, plus one (a leading space that a
    decoder drops for a token on its own). A text of ``n`` characters therefore has at least
    ``n / max_token_chars`` tokens (unless the tokenizer's normalizer deletes characters, which the bases
    served here — byte-level and SentencePiece decoders — do not)."""
    if tokenizer is None:
        return 1
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    return max((len(p) for p in pieces), default=1) + 1
