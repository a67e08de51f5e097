"""A tiny world for command-line tests: a registry holding a tiny BERT (``tbert``) and a tiny Llama
(``tllama``), both with a word-level tokenizer, small data files, and recipes whose adapters carry a template.

``run(...)`` calls the real command line (``adapterhub_local.cli.main``) in-process and returns the exit code
with what it wrote on stdout and stderr.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapterhub_local.cli import main
from adapterhub_local.registry import Registry
from tests.conftest import make_tiny_bert, make_tiny_llama
from tests.train.conftest import classification_rows, cls_raw, gen_raw, save_tokenizer, write_jsonl

GEN_TEMPLATE = "restaurant : {mr} ."
"""A prompt template made of words the tiny tokenizer knows."""
CLS_TEMPLATE = "the movie : {text}"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Result:
    """``adapterhub ARGV`` in-process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def bracket_rows(n_mr: int = 10, refs: int = 2) -> list[dict[str, Any]]:
    """E2E-style rows whose meaning representations carry brackets (``area[riverside]``)."""
    rows = []
    for i in range(n_mr):
        food, area = ("pub", "restaurant")[i % 2], ("riverside", "city centre")[(i // 2) % 2]
        mr = f"name[{food}], area[{area}], price[{'cheap' if i % 3 else 'high'}]"
        for r in range(refs):
            ref = f"there is a {food} in the {area} ." if r % 2 == 0 else f"a {food} near the {area} ."
            rows.append({"mr": mr, "ref": ref, "group": f"mr{i}", "text": ref})
    return rows


@dataclass
class World:
    root: Path
    registry: Registry
    cls_data: Path
    gen_data: Path
    cls_recipe: Path
    gen_recipe: Path

    @property
    def reg(self) -> str:
        return str(self.registry.root)


def make_world(root: Path) -> World:
    """Bases, data and recipes (``tcls``: classification with a template; ``tgen``: generation with a template)."""
    root.mkdir(parents=True, exist_ok=True)
    bert = make_tiny_bert(root / "tiny-bert")
    llama = make_tiny_llama(root / "tiny-llama")
    for directory in (bert, llama):
        save_tokenizer(directory)
    registry = Registry(root / "registry")
    registry.add_base("tbert", str(bert))
    registry.add_base("tllama", str(llama))
    cls_data = write_jsonl(root / "cls.jsonl", classification_rows())
    gen_data = write_jsonl(root / "gen.jsonl", bracket_rows())
    cls = cls_raw(cls_data, root / "runs")
    cls["data"]["template"] = CLS_TEMPLATE
    gen = gen_raw(gen_data, root / "runs")
    gen["data"]["template"] = GEN_TEMPLATE
    gen["train"]["max_steps"] = 4
    cls_recipe = root / "tcls.yaml"
    gen_recipe = root / "tgen.yaml"
    cls_recipe.write_text(yaml.safe_dump(cls), encoding="utf-8")
    gen_recipe.write_text(yaml.safe_dump(gen), encoding="utf-8")
    return World(root, registry, cls_data, gen_data, cls_recipe, gen_recipe)
