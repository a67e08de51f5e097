"""The task spec an adapter carries: templates filled from raw input (one field, several, none), output
cleaned of the completion prefix and cut at stops (also when streamed), stops derived from the data, strict
parsing of stored specs, and specs derived from older cards' recipes."""

from __future__ import annotations

import pytest

from adapterhub_local.errors import ConfigError, FormatError
from adapterhub_local.task_spec import TaskSpec, derive_stops, literal_prefix, spec_from_card, template_fields

E2E = TaskSpec("generation", "Meaning representation: {mr}\nDescription:", " ", ("\n", "Meaning representation:"))


@pytest.mark.parametrize("text", ["name[Alimentum], food[Chinese]", "{not a field}", "", "x" * 500])
def test_one_field_templates_take_any_text_verbatim(text: str) -> None:
    assert E2E.apply_template(text) == f"Meaning representation: {text}\nDescription:"


def test_several_fields_take_a_json_object_or_a_mapping_and_name_what_is_missing() -> None:
    spec = TaskSpec("generation", "Q: {question}\nContext: {context}\nA:")
    assert spec.apply_template('{"question": "why", "context": "because"}') == "Q: why\nContext: because\nA:"
    assert spec.apply_template({"question": "a", "context": "b"}) == "Q: a\nContext: b\nA:"
    with pytest.raises(ConfigError, match=r"needs fields question, context.*--raw"):
        spec.apply_template("just text")
    with pytest.raises(ConfigError, match="needs field 'context'"):
        spec.apply_template('{"question": "why"}')


def test_no_template_means_the_input_is_used_as_given() -> None:
    assert TaskSpec("classification").apply_template("A [bracketed] {braced} text") == "A [bracketed] {braced} text"


def test_a_template_without_fields_refuses_rather_than_drop_the_input() -> None:
    with pytest.raises(ConfigError, match=r"no field for the input.*--raw"):
        TaskSpec("generation", "Describe a restaurant:").apply_template("name[Alimentum]")


@pytest.mark.parametrize(("generated", "answer"), [
    (" The Alimentum serves Chinese food.", "The Alimentum serves Chinese food."),
    (" First line.\nMeaning representation: name[X]", "First line."),
    ("No prefix here", "No prefix here"),
    (" Ends at the next prompt Meaning representation: x", "Ends at the next prompt "),
    ("", ""),
])
def test_clean_output_drops_the_prefix_and_cuts_at_the_first_stop(generated: str, answer: str) -> None:
    assert E2E.clean_output(generated) == answer


@pytest.mark.parametrize("chunks", [[" ", "The", " pub"], [" The pub"], ["", " ", "", "The pub"], ["The", " pub"],
                                    [" "], ["  two spaces"]])
def test_streamed_output_equals_whole_output_for_any_chunking(chunks: list[str]) -> None:
    spec = TaskSpec("generation", "{x}", " ")
    assert "".join(spec.clean_stream(iter(chunks))) == spec.clean_output("".join(chunks))
    multi = TaskSpec("generation", "{x}", "Answer: ")
    for split in range(len("Answer: yes") + 1):
        pieces = ["Answer: yes"[:split], "Answer: yes"[split:]]
        assert "".join(multi.clean_stream(iter(pieces))) == "yes"


def test_stops_come_from_the_data() -> None:
    assert derive_stops("Review: {text}\nAnswer:", [" positive", " negative"]) == ["\n", "Review:"]
    assert derive_stops("Review: {text}\nAnswer:", ["line one\nline two"]) == ["Review:"]  # newlines are content
    assert derive_stops("{text} =>", [" Review: quoted"]) == ["\n"]  # no text before the first field
    assert derive_stops("Review: {text}", ["says Review: x"]) == ["\n"]
    assert derive_stops(None, []) == []


def test_template_helpers() -> None:
    assert template_fields("{a} and {b.x} and {c[0]} and {a}") == ["a", "b", "c"]
    assert literal_prefix(" {ref}") == " "
    assert literal_prefix("{label}") == ""
    assert literal_prefix("Answer: {label}.") == "Answer: "


def test_round_trip_and_strict_parsing() -> None:
    spec = TaskSpec("classification", "Review: {text}", labels=("negative", "positive"), pooling="mean")
    assert TaskSpec.from_dict(spec.to_dict(), "card") == spec
    assert TaskSpec.from_dict(E2E.to_dict(), "card") == E2E
    bad = {"type": "poetry", "template": 3, "stop": ["", 1], "labels": "a,b", "colour": "red"}
    with pytest.raises(FormatError) as caught:
        TaskSpec.from_dict(bad, "card.json")
    message = str(caught.value)
    for expected in ("'colour'", "'poetry'", "template is not a string", "stop is not", "labels is not"):
        assert expected in message
    with pytest.raises(FormatError, match="not a valid format string"):
        TaskSpec.from_dict({"type": "generation", "template": "{unclosed"}, "card.json")
    with pytest.raises(FormatError, match="not a JSON object"):
        TaskSpec.from_dict(["generation"], "card.json")


def test_cards_without_a_spec_get_one_from_their_recipe_or_none() -> None:
    recipe = {"task": {"type": "generation"},
              "data": {"template": "Meaning representation: {mr}\nDescription:", "completion": " {ref}"}}
    derived = spec_from_card({}, recipe)
    assert derived is not None
    assert derived.template == recipe["data"]["template"] and derived.completion_prefix == " "
    assert derived.stop == ("Meaning representation:",)  # no data on the card: no newline evidence
    assert spec_from_card({"task_spec": E2E.to_dict()}, recipe) == E2E  # a stored spec wins
    assert spec_from_card({}, {}) is None  # an import
    assert spec_from_card({}, {"task": {"type": "generation"}, "data": {"mix": [{"path": "x"}]}}) is None
    classifier = spec_from_card({}, {"task": {"type": "classification", "pooling": "native"}, "data": {}},
                                ["neg", "pos"])
    assert classifier == TaskSpec("classification", None, labels=("neg", "pos"), pooling="native")
