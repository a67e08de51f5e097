"""``adapterhub combine`` through the real command line, and the lineage ``show``/``list``/``verify`` display."""

from __future__ import annotations

import json

import pytest

from adapterhub_local.registry import Registry
from tests.cli.tiny import run


def test_combine_cli_registers_with_lineage(composed_registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(composed_registry.root)
    result = run(capsys, "combine", "ta", "tb", "--weights", "0.7,0.3", "--name", "mix", "-R", reg)
    assert result.code == 0, result.err
    assert "registered mix@1 (rank 6) = cat(ta@1*0.7 + tb@1*0.3)" in result.out
    shown = run(capsys, "show", "mix", "--json", "-R", reg).json()
    assert [p["name"] for p in shown["composition"]["parents"]] == ["ta", "tb"]
    bad = run(capsys, "combine", "ta", "tb", "--weights", "0.7,nan", "--name", "mix", "-R", reg)
    assert bad.code != 0 and "--weights item 2: weight 'nan' is not a plain finite number" in bad.err
    bad = run(capsys, "combine", "ta", "sp", "--name", "mix", "-R", reg)
    assert bad.code != 0 and "soft prompt" in bad.err and "only LoRA adapters can be combined" in bad.err
    assert json.loads(run(capsys, "list", "mix", "--json", "-R", reg).out)[0]["version"] == 1  # one version only


def test_lineage_in_show_list_and_verify(composed_registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(composed_registry.root)
    assert run(capsys, "combine", "ta", "tb", "--weights", "0.7,-0.3", "--name", "mix", "-R", reg).code == 0
    before = composed_registry.load_adapter("mix").tensors
    shown = run(capsys, "show", "mix", "-R", reg)
    assert "ta@1*0.7 + tb@1*-0.3 --cat--> mix@1" in shown.out
    assert run(capsys, "show", "ta", "--json", "-R", reg).json()["children"] == ["mix@1"]
    assert run(capsys, "show", "tc", "--json", "-R", reg).json()["children"] == []
    listed = run(capsys, "list", "-R", reg)
    assert "ta@1*0.7 + tb@1*-0.3 --cat--> mix@1" in listed.out
    assert [r["composition"] is not None for r in run(capsys, "list", "--json", "-R", reg).json()] == [
        True, False, False, False, False]  # mix, sp, ta, tb, tc
    # deleting a parent does not break the child: it holds its own weights
    assert run(capsys, "delete", "ta", "--yes", "-R", reg).code == 0
    after = composed_registry.load_adapter("mix").tensors
    assert all(after[k].equal(v) for k, v in before.items())
    assert "ta@1 (deleted)*0.7 + tb@1*-0.3 --cat--> mix@1" in run(capsys, "show", "mix", "-R", reg).out
    parents = run(capsys, "show", "mix", "--json", "-R", reg).json()["parents"]
    assert [(p["ref"], p["state"]) for p in parents] == [("ta@1", "deleted"), ("tb@1", "present")]
    assert run(capsys, "verify", "-R", reg).code == 0
    # verify covers the lineage record: a malformed one is reported
    card_path = composed_registry.path_of(composed_registry.resolve("mix")) / "card.json"
    card = json.loads(card_path.read_text())
    card["composition"]["parents"][0]["weight"] = "heavy"
    card_path.chmod(0o644)
    card_path.write_text(json.dumps(card))
    failed = run(capsys, "verify", "-R", reg)
    assert failed.code != 0 and "composition must be" in failed.out + failed.err


def test_cards_without_lineage_still_load(composed_registry: Registry) -> None:
    from adapterhub_local.registry.cards import AdapterCard

    card = composed_registry.resolve("ta")
    data = json.loads(card.to_json())
    del data["composition"]  # a card written before the field existed
    old = AdapterCard.from_dict(data, "old card")
    assert old.composition is None and old.content_hash == card.content_hash
