"""Names and references: traversal refused, every reference form parsed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapterhub_local.errors import InvalidNameError, InvalidReferenceError
from adapterhub_local.registry.names import parse_reference, validate_name, validate_tag


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


@pytest.mark.parametrize("bad", ["x\n", "x ", " x", "x\t", "x\r\n", "\nx", "x\x7f", "x\u200b", "x\u00e9", "ｘ",
                                 "x\x1b[31m"])
def test_names_are_validated_on_the_whole_string(bad: str) -> None:
    with pytest.raises(InvalidNameError, match="invalid"):
        validate_name(bad)
    with pytest.raises(InvalidNameError):
        validate_tag("t" + bad)


@pytest.mark.parametrize("reserved", ["sha256", "SHA256", "Sha256"])
def test_names_colliding_with_reference_syntax_are_refused(reserved: str) -> None:
    with pytest.raises(InvalidNameError, match="reference syntax"):
        validate_name(reserved)


@pytest.mark.parametrize("bad", ["x\n", "x ", " x@1", "x@1\n", "x:prod ", "x@\u00b2", "x@01", "x@1\u0660",
                                 "sha256:abcd\n", "x@99999999999999999999999"])
def test_references_are_parsed_in_canonical_form_only(bad: str) -> None:
    with pytest.raises((InvalidReferenceError, InvalidNameError)):
        parse_reference(bad)


def test_registry_refuses_noncanonical_names_end_to_end(tmp_path: Path) -> None:
    from adapterhub_local.registry import Registry

    registry = Registry(tmp_path / "r")
    for bad in ("tiny\n", "sha256", "tiny "):
        with pytest.raises(InvalidNameError):
            registry.add_base(bad, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "r/bases").iterdir()) == []
