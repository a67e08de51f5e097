"""Names and references: traversal refused, every reference form parsed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapterhub_local.errors import InvalidNameError, InvalidReferenceError
from adapterhub_local.registry.names import parse_reference, validate_name


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/../../b", "..", ".hidden", "a/b", "", "x" * 101, "a b", "a\\b",
                                 "a\x00b", "-rf"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid"):
        validate_name(bad)


def test_reference_forms() -> None:
    assert parse_reference("sent").name == "sent"
    ref = parse_reference("sent@3")
    assert (ref.name, ref.version) == ("sent", 3)
    ref = parse_reference("sent:prod")
    assert (ref.name, ref.tag) == ("sent", "prod")
    assert parse_reference("sha256:ABCDEF12").sha_prefix == "abcdef12"


@pytest.mark.parametrize("bad", ["x@0", "x@-1", "x@a", "sha256:xyz", "sha256:ab", "x:1tag", "../x@2", ""])
def test_bad_references(bad: str) -> None:
    with pytest.raises((InvalidReferenceError, InvalidNameError)):
        parse_reference(bad)


@given(st.text(min_size=1, max_size=120))
def test_accepted_names_are_safe_path_components(text: str) -> None:
    try:
        name = validate_name(text)
    except InvalidNameError:
        return
    assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")
    assert str(parse_reference(name)) == name
