"""Registry commands: ``base add/list/show/remove``, ``list``, ``show``, ``tag``, ``untag``, ``delete``,
``verify``, ``gc``, ``index rebuild``, ``import``, ``push``, ``pull``, ``check`` (engine = PEFT)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from adapterhub_local import assets
from adapterhub_local.check.sidecar import CHECKABLE_KINDS, CheckRecord
from adapterhub_local.check.sidecar import summary as check_summary
from adapterhub_local.cli.common import app, check_device, console, get_registry, print_json, table
from adapterhub_local.compose import lineage
from adapterhub_local.errors import ConfigError, IntegrityError
from adapterhub_local.registry import maintenance, remote
from adapterhub_local.registry.cards import PER_EXAMPLE_KEYS, CardInfo

base_app = typer.Typer(help="Register and inspect base models.", no_args_is_help=True)
index_app = typer.Typer(help="Maintain the SQLite index.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(index_app, name="index")


@base_app.command("add")
def base_add(
    name: str = typer.Argument(..., help="Name to register the base under."),
    source: str = typer.Argument(
        ..., help="A HF model directory, a .gguf file, a hub id, or a bundled asset (asset:minilm, asset:smollm2)."
    ),
    revision: str | None = typer.Option(None, help="Hub revision (commit, branch or tag) for a hub id."),
) -> None:
    """Register a base model (GGUF is dequantized once to safetensors) and fingerprint it."""
    if assets.is_asset(source):
        source = str(assets.resolve(source))
    record = get_registry(create=True).add_base(name, source, revision)
    console.print(f"registered base [bold]{record.name}[/] ({record.architecture}, {record.source_kind}) "
                  f"fingerprint {record.short}")


@base_app.command("list")
def base_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List registered bases."""
    records = get_registry().list_bases()
    if as_json:
        print_json([{**dataclasses.asdict(r), "path": str(r.path)} for r in records])
        return
    table("bases", ["name", "architecture", "source", "fingerprint", "created"],
          [[r.name, r.architecture, f"{r.source_kind}: {_short_source(r.source, r.source_kind)}", r.short,
            r.created[:19]] for r in records])


def _short_source(source: str, kind: str) -> str:
    return source if kind == "hub" else Path(source).name


@base_app.command("show")
def base_show(name: str, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show one base's record."""
    record = get_registry().base(name)
    data = {**dataclasses.asdict(record), "path": str(record.path)}
    if as_json:
        print_json(data)
        return
    table(f"base {name}", ["field", "value"], [[k, v] for k, v in data.items()])


@base_app.command("remove")
def base_remove(name: str) -> None:
    """Remove a base no adapter version uses."""
    get_registry().remove_base(name)
    console.print(f"removed base {name}")


@app.command("list")
def list_adapters(
    name: str | None = typer.Argument(None, help="Only versions of this adapter."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    tags: bool = typer.Option(False, "--tags", help="List tags instead of versions."),
) -> None:
    """List adapter versions (or tags)."""
    registry = get_registry()
    if tags:
        rows = registry.tags(name)
        if as_json:
            print_json([{"name": n, "tag": t, "version": v} for n, t, v in rows])
        else:
            table("tags", ["name", "tag", "version"], [list(r) for r in rows])
        return
    versions = registry.list_adapters(name)
    tag_map: dict[tuple[str, int], list[str]] = {}
    for n, t, v in registry.tags(name):
        tag_map.setdefault((n, v), []).append(t)
    cards = {c.ref: c for c in lineage.cards_of(registry, [(r.name, r.version) for r in versions])}
    if as_json:
        print_json([{**dataclasses.asdict(r), "ref": r.ref, "tags": tag_map.get((r.name, r.version), []),
                     "composition": getattr(cards.get(r.ref), "composition", None)} for r in versions])
        return
    table("adapters", ["ref", "kind", "rank", "task", "base", "size", "sha256", "tags", "created"],
          [[r.ref, r.kind, r.rank, r.task, r.base, _size(r.size_bytes), r.sha256[:12],
            ",".join(tag_map.get((r.name, r.version), [])), r.created[:19]] for r in versions])
    for line in lineage.graph_lines(registry, list(cards.values())):  # combinations: parents → child
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@app.command("show")
def show(ref: str, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show a version's card."""
    registry = get_registry()
    card = registry.resolve(ref)
    data = {**dataclasses.asdict(card), "content_hash": card.content_hash,
            "parents": [dataclasses.asdict(link) for link in lineage.links(registry, card)],
            "children": lineage.children(registry, card), "parity": check_summary(registry, card)}
    if as_json:
        print_json(data)
        return
    # Per-example evaluation records (kept for the sweep's noise estimates) are data, not a summary: --json has them.
    data["metrics"] = {k: (f"<{_record_size(v)} per-example records; see --json>" if k in PER_EXAMPLE_KEYS else v)
                       for k, v in card.metrics.items()}
    data["composition"] = " ".join(lineage.graph_lines(registry, [card])) or None
    data["parents"] = None
    table(f"adapter {card.ref}", ["field", "value"], [[k, v] for k, v in data.items() if v not in (None, {}, [])])


def _record_size(record: Any) -> int:
    return max((len(v) for v in record.values() if isinstance(v, list)), default=0) if isinstance(record, dict) else 0


@app.command("tag")
def tag(ref: str, tag_name: str = typer.Argument(..., metavar="TAG")) -> None:
    """Point NAME:TAG at the version REF resolves to."""
    card = get_registry().tag(ref, tag_name)
    console.print(f"{card.name}:{tag_name} -> {card.ref}")


@app.command("untag")
def untag(name: str, tag_name: str = typer.Argument(..., metavar="TAG")) -> None:
    """Remove a tag."""
    get_registry().untag(name, tag_name)
    console.print(f"removed tag {name}:{tag_name}")


@app.command("delete")
def delete(ref: str, yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Delete one adapter version."""
    registry = get_registry()
    name, version = registry.locate(ref)
    if not yes and not typer.confirm(f"delete {name}@{version}?"):
        raise typer.Exit(1)
    console.print(f"deleted {registry.delete(f'{name}@{version}')}")


@app.command("verify")
def verify(ref: str | None = typer.Argument(None, help="One version; default: all.")) -> None:
    """Check the sha256 of every stored file; exit non-zero naming each damaged file."""
    report = maintenance.verify(get_registry(), ref)
    for problem in report.problems:
        console.print(f"[red]FAIL[/] {problem}", highlight=False)
    if not report.ok:
        raise IntegrityError(f"{len(report.problems)} problem(s) in {len(report.checked)} version(s)",
                             "restore damaged versions from an export or delete them")
    console.print(f"OK: {len(report.checked)} version(s) verified")


@app.command("gc")
def gc() -> None:
    """Remove what killed writers left behind and heal the index."""
    report = maintenance.collect_garbage(get_registry())
    console.print(f"removed {len(report.removed)} item(s), freed {_size(report.freed_bytes)}")


@index_app.command("rebuild")
def index_rebuild() -> None:
    """Recreate index.db from the version directories."""
    count = maintenance.rebuild_index(get_registry())
    console.print(f"index rebuilt: {count} version(s)")


@app.command("import")
def import_adapter(
    directory: Path = typer.Argument(..., help="A PEFT adapter directory (LoRA or prompt tuning)."),
    name: str = typer.Option(..., "--name", help="Adapter name in the registry."),
    base: str = typer.Option(..., "--base", help="Registered base the adapter belongs to."),
    task: str | None = typer.Option(None, help="Task name to record."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the parity check against PEFT."),
) -> None:
    """Import a PEFT adapter directory as a new version (shapes checked against the base), then check that the
    engine serves it as PEFT runs it (``--no-check`` skips that)."""
    registry = get_registry(create=True)
    card = registry.register_adapter(name, directory, base, CardInfo(task=task, source=str(directory)))
    console.print(f"imported {card.ref} ({card.kind}, rank {card.rank}) on base {card.base}")
    if not no_check and card.kind in CHECKABLE_KINDS:
        from adapterhub_local.check.parity import run_check

        report_check(run_check(registry, card.ref))


def report_check(record: CheckRecord) -> None:
    """One line: the check's verdict, its largest difference against the tolerance, and each path's figure."""
    paths = ", ".join(f"{k} {v:.2g}" for k, v in record.paths.items())
    console.print(f"parity {'passed' if record.passed else 'FAILED'} for {record.ref} ({record.dtype}, "
                  f"{record.prompts} prompts): largest logit difference {record.max_logit_diff:.3g} (tolerance "
                  f"{record.tolerance:.3g}), greedy agreement {record.greedy_agreement:.0%} — {paths}")


@app.command("check")
def check(
    ref: str,
    dtype: str = typer.Option("float32", help="Engine and reference dtype: float32, bfloat16 or float16."),
    device: str | None = typer.Option(None, help="Device (default: cuda when available, else cpu)."),
    prompts: int = typer.Option(3, help="How many prompts of the adapter's task to run."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Run an adapter through PEFT and through the engine (swap, mixed batch, merge, dynamic and static
    decoding), record the largest logit difference and greedy agreement, and fail above the dtype's tolerance."""
    import torch

    from adapterhub_local.check.parity import run_check

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ConfigError([f"--dtype {dtype!r} is not one of {', '.join(dtypes)}"], "pick one of them",
                          what="option")
    record = run_check(get_registry(), ref, dtype=dtypes[dtype], device=check_device(device), prompts=prompts)
    if as_json:
        print_json(dataclasses.asdict(record))
        return
    report_check(record)


@app.command("push")
def push(ref: str, repo_id: str, public: bool = typer.Option(False, "--public", help="Create a public repo.")) -> None:
    """Upload a version's export to a Hugging Face Hub repo."""
    commit = remote.push(get_registry(), ref, repo_id, private=not public)
    console.print(f"pushed {ref} to {repo_id} ({commit})")


@app.command("pull")
def pull(
    repo_id: str,
    name: str = typer.Option(..., "--name", help="Adapter name to register under."),
    base: str = typer.Option(..., "--base", help="Registered base."),
    revision: str | None = typer.Option(None, help="Repo revision."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip the parity check against PEFT."),
) -> None:
    """Download an adapter repo, register it, and check that the engine serves it as PEFT runs it."""
    registry = get_registry(create=True)
    card = remote.pull(registry, repo_id, name, base, revision)
    console.print(f"pulled {repo_id} as {card.ref}")
    if not no_check and card.kind in CHECKABLE_KINDS:
        from adapterhub_local.check.parity import run_check

        report_check(run_check(registry, card.ref))
