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
