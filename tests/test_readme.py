"""The README's CLI tour is a script: every ``adapterhub`` command in its ``bash`` blocks runs, in order, through
the real command line, against tiny models (the ``minilm`` and ``smollm2`` assets are swapped for 2-layer
random models with a word-level tokenizer) and the shipped data, with extra overrides that shorten training.
Commands that need the network or run forever (``push``, ``pull``, ``serve``) are parsed, not run, so their
options must still exist. A README that drifts from the CLI fails here."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from typer.core import TyperGroup

from adapterhub_local import assets
from adapterhub_local.cli import main
from adapterhub_local.cli.common import app, hoist_global_options
from tests.conftest import make_tiny_bert, make_tiny_llama
from tests.train.conftest import classification_rows, save_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
PARSE_ONLY = {"push", "pull", "serve"}
"""Network or long-running commands: checked by the argument parser only."""
_SMALL = ["data.max_train_examples=24", "data.max_eval_examples=8", "eval.max_test_examples=2", "train.max_steps=2",
          "train.eval_every=2", "train.batch_size=4", "eval.max_new_tokens=4"]
SHORTER = {
    "train": [x for pair in [*_SMALL, "eval.forgetting_samples=4", "eval.compare_base=false"] for x in ("--set", pair)],
    "sweep": [*(x for pair in _SMALL for x in ("--set", pair)), "--no-progress"],
    "generate": ["--max-new-tokens", "6"],
}
"""Options appended to long-running commands (``--set`` pairs and later options win over the README's own)."""


def tour_commands(readme: str) -> list[str]:
    """The ``adapterhub`` command lines of the tour's ``bash`` blocks (continuation lines joined)."""
    start = readme.index("## A tour of the CLI")
    end = readme.index("\n## ", start + 1)
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", readme[start:end], flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("adapterhub "):
                commands.append(line.strip())
    return commands


@pytest.fixture
def tour_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory like a clone's root: recipes, a held-out file, an empty registry; tiny model assets."""
    bert = make_tiny_bert(tmp_path / "assets" / "minilm")
    llama = make_tiny_llama(tmp_path / "assets" / "smollm2")
    for directory in (bert, llama):
        save_tokenizer(directory)
    _add_chat_template(llama)
    monkeypatch.setattr(assets, "minilm_dir", lambda: bert)
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: llama)
    work = tmp_path / "clone"
    shutil.copytree(REPO / "recipes", work / "recipes")
    write_jsonl(work / "held_out.jsonl", classification_rows(n_movies=2))
    monkeypatch.chdir(work)
    monkeypatch.setenv("ADAPTERHUB_HOME", str(work / "registry"))
    threads = torch.get_num_threads()
    yield work
    torch.set_num_threads(threads)


def _add_chat_template(directory: Path) -> None:
    """SmolLM2-Instruct has a chat template; give the tiny stand-in a minimal one (words it knows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} : {% endfor %}"
    tokenizer.save_pretrained(str(directory))


def parses(argv: list[str]) -> None:
    """Parse ``argv`` as the CLI would, without running the command."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    args = hoist_global_options(argv, group)
    with group.make_context("adapterhub", args) as ctx:
        # The group leaves "<subcommand> <its args>" unparsed (click keeps the subcommand name apart).
        protected = list(getattr(ctx, "protected_args", None) or getattr(ctx, "_protected_args", []))
        name, command, rest = group.resolve_command(ctx, protected + ctx.args)
        assert command is not None, name
        command.make_context(name, rest, parent=ctx)


def test_the_tour_has_the_commands_it_promises() -> None:
    commands = tour_commands((REPO / "README.md").read_text(encoding="utf-8"))
    names = {shlex.split(c, comments=True)[1] for c in commands}
    assert {"base", "train", "eval", "predict", "generate", "merge", "list", "show", "tag", "untag", "verify",
            "export", "import", "delete", "gc", "index", "sweep", "compare", "truncate", "serve", "push",
            "pull"} <= names
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# adapterhub_local\n\n```bash\nbash scripts/demo.sh")
    assert "../shared" not in readme and (REPO / "docs" / "DESIGN.md").exists()


def test_every_tour_command_runs(tour_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for line in tour_commands((REPO / "README.md").read_text(encoding="utf-8")):
        argv = shlex.split(line, comments=True)[1:]
        if argv[0] in PARSE_ONLY:
            parses(argv)
            continue
        capsys.readouterr()
        code = main([*argv, *SHORTER.get(argv[0], [])])
        captured = capsys.readouterr()
        assert code == 0, f"`{line}` failed: {captured.err}"
        if "--json" in argv and "--stream" not in argv:
            json.loads(captured.out)
    # What the tour promised happened.
    assert (tour_dir / "merged" / "model.safetensors").exists()
    assert (tour_dir / "exports" / "sentiment" / "adapter_model.safetensors").exists()
    assert (tour_dir / "compare").is_dir()
