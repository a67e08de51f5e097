"""``adapterhub combine``: argument parsing for adapter composition (the work is in :mod:`adapterhub_local.compose`)."""

from __future__ import annotations

import typer
from rich.markup import escape

from adapterhub_local.cli.common import app, console, get_registry, print_json, table
from adapterhub_local.compose.combine import CombineOptions, combine
from adapterhub_local.compose.lineage import describe
from adapterhub_local.compose.methods import METHODS
from adapterhub_local.compose.spec import parse_weights


@app.command("combine")
def combine_cmd(
    refs: list[str] = typer.Argument(..., help="Two or more LoRA adapters of one base: name, name@N, name:tag …"),
    name: str = typer.Option(..., "--name", help="Name to register the combination under."),
    weights: str | None = typer.Option(None, "--weights", help="One weight per adapter, e.g. 0.7,0.3 "
                                       "(default: 1 each). Negative subtracts (cat, linear, svd)."),
    method: str = typer.Option("cat", "--method", help=f"{' | '.join(METHODS)}. cat is exact (rank Σ rᵢ); "
                               "svd keeps the best rank-K approximation; linear/ties/dare_* are PEFT's "
                               "approximate merges (equal ranks)."),
    rank: int | None = typer.Option(None, "--rank", help="svd: the result's rank (default: largest parent rank)."),
    density: float | None = typer.Option(None, "--density", help="ties, dare_linear, dare_ties: fraction of "
                                         "entries kept, in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="dare_*: seed of the random drop pattern."),
    as_json: bool = typer.Option(False, "--json", help="Print the new card as JSON."),
) -> None:
    """Combine registered LoRA adapters into a new registered adapter whose card records its parents."""
    parsed = parse_weights(weights, len(refs)) if weights is not None else [1.0] * len(refs)
    card = combine(get_registry(), refs, parsed, name, CombineOptions(method, rank, density, seed))
    if as_json:
        print_json({"ref": card.ref, "rank": card.rank, "composition": card.composition,
                    "content_hash": card.content_hash})
        return
    console.print(f"registered {escape(card.ref)} (rank {card.rank}) = {escape(describe(card))}", highlight=False)


def eval_combination(ref: str, max_examples: int | None, batch_size: int, max_new_tokens: int | None,
                     as_json: bool) -> None:
    """``adapterhub eval REF`` without ``--data`` on a combined adapter: the task × adapter table."""
    from adapterhub_local.compose.evaluate import evaluate_composition, table_rows

    result = evaluate_composition(get_registry(), ref, max_examples=max_examples, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens)
    if as_json:
        print_json(result.to_dict())
        return
    columns, rows = table_rows(result)
    table(f"{result.ref} on its parents' held-out tasks", columns, rows)
    for line in result.skipped:
        console.print(f"skipped: {escape(line)}", highlight=False)
