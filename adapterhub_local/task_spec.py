"""What an adapter's task looks like from outside: how raw input becomes the model's input, and how the
model's output becomes the answer.

Training writes a :class:`TaskSpec` on every card (``card.extra["task_spec"]``) so that ``generate``,
``predict``, ``eval`` and the server put an adapter to work the way it was trained, without the user
knowing its template by heart:

* ``template`` — the prompt (generation) or input (classification) template, ``str.format`` style over
  named fields (``"Meaning representation: {mr}\\nDescription:"``). Raw text fills its one field; a
  template with several fields takes a JSON object of them;
* ``completion_prefix`` — the literal text every training completion started with (``" "`` for
  ``" {ref}"``); it is the format, not the answer, so it is stripped from what the model returns;
* ``stop`` — stop strings: where the trained format says an answer has ended (a newline when no training
  completion held one; the start of the next prompt);
* ``labels`` and ``pooling`` — for classifiers: the label set in head order and how the head pools.

This is a foundations module: it knows nothing of the registry or the engine, only plain dicts and strings.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from adapterhub_local.errors import ConfigError, FormatError

SPEC_KEY = "task_spec"
"""Where the spec lives on a card: ``card.extra[SPEC_KEY]``."""
TASK_TYPES = ("generation", "classification")


def template_fields(template: str) -> list[str]:
    """Field names a ``str.format`` template refers to, in order, without repeats (``"{mr}\\n"`` → ``["mr"]``)."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name != "":
            base = name.split(".")[0].split("[")[0]
            if base not in names:
                names.append(base)
    return names


def render(template: str, row: Mapping[str, Any]) -> str:
    """``template`` filled from ``row`` (``None`` values as empty strings)."""
    return template.format(**{k: "" if v is None else v for k, v in row.items()})


def literal_prefix(template: str) -> str:
    """The literal text before a template's first field (``" {ref}"`` → ``" "``; no field: the whole text)."""
    for literal, name, _, _ in string.Formatter().parse(template):
        return literal if name is not None else template
    return ""


def derive_stops(template: str | None, completions: Iterable[str]) -> list[str]:
    """Stop strings the training data justifies: ``"\\n"`` when no completion contains a newline, and the
    first line of the prompt template's leading text (the model starting the next example), unless a
    completion contains it."""
    texts = list(completions)
    stops: list[str] = []
    if texts and not any("\n" in t for t in texts):
        stops.append("\n")
    lead = literal_prefix(template).strip().split("\n")[0].strip() if template else ""
    if lead and not any(lead in t for t in texts):
        stops.append(lead)
    return stops


@dataclass(frozen=True)
class TaskSpec:
    """How to talk to one adapter (see the module docstring)."""

    type: str
    """``generation`` or ``classification``."""
    template: str | None = None
    completion_prefix: str = ""
    stop: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None
    pooling: str | None = None

    @property
    def fields(self) -> list[str]:
        """The template's field names (empty without a template)."""
        return template_fields(self.template) if self.template else []

    def apply_template(self, text: str | Mapping[str, Any]) -> str:
        """The model input for raw ``text``: the template with its field(s) filled.

        A template with one field takes the text as that field. One with several fields takes a mapping,
        or text that is a JSON object of them. Without a template the text is returned as it is.
        """
        if self.template is None:
            if not isinstance(text, str):
                raise ConfigError(["this adapter has no input template, so the input must be plain text"],
                                  "pass the text itself", what="input")
            return text
        names = self.fields
        values = _fields_from_text(text, names) if isinstance(text, str) else dict(text)
        missing = [n for n in names if n not in values]
        if missing:
            raise ConfigError([f"the adapter's template {self.template!r} needs field {n!r}" for n in missing],
                              "pass a JSON object with every field, or use --raw to send the text unchanged",
                              what="input")
        return render(self.template, values)

    def clean_output(self, text: str) -> str:
        """Generated text as the answer: the completion prefix dropped, cut at the first stop string."""
        if self.completion_prefix and text.startswith(self.completion_prefix):
            text = text[len(self.completion_prefix):]
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut]

    def clean_stream(self, chunks: Iterable[str]) -> Iterator[str]:
        """:meth:`clean_output` for streamed text: holds back only what could still be the prefix."""
        stripper = self.prefix_stripper()
        for chunk in chunks:
            out = stripper.feed(chunk)
            if out:
                yield out
        rest = stripper.flush()
        if rest:
            yield rest

    def prefix_stripper(self) -> PrefixStripper:
        """A push-style remover of the completion prefix, for streams that are not iterables (the server)."""
        return PrefixStripper(self.completion_prefix)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored on the card."""
        return {"type": self.type, "template": self.template, "completion_prefix": self.completion_prefix,
                "stop": list(self.stop), "labels": list(self.labels) if self.labels is not None else None,
                "pooling": self.pooling}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TaskSpec:
        """Parse a stored spec strictly (cards are untrusted input); :class:`FormatError` names each problem."""
        if not isinstance(data, dict):
            raise FormatError(f"{where}: task_spec is not a JSON object", "re-register the adapter")
        problems: list[str] = []
        known = {"type", "template", "completion_prefix", "stop", "labels", "pooling"}
        problems += [f"unknown field {k!r}" for k in sorted(set(data) - known)]
        kind = data.get("type")
        if kind not in TASK_TYPES:
            problems.append(f"type {kind!r} is not one of {', '.join(TASK_TYPES)}")
        template = data.get("template")
        if template is not None and not isinstance(template, str):
            problems.append("template is not a string")
        elif template is not None:
            try:
                template_fields(template)
            except ValueError as exc:
                problems.append(f"template is not a valid format string ({exc})")
        prefix = data.get("completion_prefix", "")
        if not isinstance(prefix, str):
            problems.append("completion_prefix is not a string")
        stop = data.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            problems.append("stop is not a list of non-empty strings")
        labels = data.get("labels")
        if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
            problems.append("labels is not a list of strings")
        pooling = data.get("pooling")
        if pooling is not None and not isinstance(pooling, str):
            problems.append("pooling is not a string")
        if problems:
            raise FormatError(f"{where}: malformed task_spec: " + "; ".join(problems), "re-register the adapter")
        return cls(str(kind), template, str(prefix), tuple(stop), tuple(labels) if labels is not None else None,
                   pooling)

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any], labels: Iterable[str] | None = None) -> TaskSpec | None:
        """A spec derived from a resolved recipe alone (cards written before specs existed): the template and
        completion prefix of a single-dataset recipe; stops from the template only. ``None`` when the recipe
        says nothing usable (imports) or mixes several datasets (no single template fits raw input)."""
        task = recipe.get("task") or {}
        data = recipe.get("data") or {}
        kind = task.get("type") if isinstance(task, dict) else None
        if kind not in TASK_TYPES or not isinstance(data, dict) or data.get("mix"):
            return None
        template = data.get("template") if isinstance(data.get("template"), str) else None
        completion = data.get("completion") if isinstance(data.get("completion"), str) else None
        if kind == "classification":
            return cls(kind, template, labels=tuple(labels) if labels is not None else None,
                       pooling=task.get("pooling") if isinstance(task.get("pooling"), str) else None)
        if template is None:
            return None
        return cls(kind, template, literal_prefix(completion) if completion else "",
                   tuple(derive_stops(template, [])))


class PrefixStripper:
    """Drops a literal prefix from the start of a stream of text pieces, holding back only what could still
    be that prefix (``feed`` each piece, then ``flush`` at the end)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._held = ""
        self._started = not prefix

    def feed(self, piece: str) -> str:
        """The text to pass on now for ``piece`` (possibly empty while the prefix is undecided)."""
        if self._started:
            return piece
        self._held += piece
        if len(self._held) < len(self.prefix) and self.prefix.startswith(self._held):
            return ""
        self._started = True
        held, self._held = self._held, ""
        return held[len(self.prefix):] if held.startswith(self.prefix) else held

    def flush(self) -> str:
        """What is still held when the stream ends inside what looked like the prefix (kept, as
        :meth:`TaskSpec.clean_output` keeps it)."""
        held, self._held = self._held, ""
        self._started = True
        return held


def spec_from_card(extra: Mapping[str, Any] | None, recipe: Mapping[str, Any] | None,
                   labels: Iterable[str] | None = None, where: str = "card") -> TaskSpec | None:
    """An adapter's spec from its card's ``extra`` and ``recipe`` (pass ``card.extra``, ``card.recipe``,
    ``card.labels``): the stored spec, else one derived from the recipe, else ``None`` (use input raw)."""
    stored = (extra or {}).get(SPEC_KEY)
    if stored is not None:
        return TaskSpec.from_dict(stored, where)
    return TaskSpec.from_recipe(recipe or {}, labels)


def _fields_from_text(text: str, names: list[str]) -> dict[str, Any]:
    if not names:
        raise ConfigError(["the adapter's template has no field for the input, so the input would be dropped"],
                          "use --raw to send the text as it is", what="input")
    if len(names) == 1:
        return {names[0]: text}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ConfigError([f"the adapter's template needs fields {', '.join(names)}, and the input is plain text"],
                          'pass a JSON object such as {"' + names[0] + '": "..."}, or use --raw', what="input")
    return parsed
