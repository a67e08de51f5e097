"""``adapterhub export REF DIR [--target peft|vllm]``: hand a version to another engine.

``peft`` (the default) writes the stored files unchanged — what ``PeftModel.from_pretrained`` loads;
``vllm`` first checks vLLM's limits (ranks, DoRA, prompt tuning, ``modules_to_save``, target modules of
the base's architecture) and refuses, with the reasons, what vLLM would refuse or serve differently.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from adapterhub_local.cli.common import app, console, get_registry, print_json
from adapterhub_local.registry import maintenance


class Target(str, Enum):
    peft = "peft"
    vllm = "vllm"


@app.command("export")
def export(
    ref: str,
    directory: Path,
    target: Target = typer.Option(Target.peft, "--target", help="peft: the stored PEFT directory; vllm: checked "
                                  "against vLLM's LoRA limits first."),
    with_card: bool = typer.Option(False, "--with-card", help="Also write card.json (peft target)."),
    served_base: str | None = typer.Option(None, "--served-base", help="vllm: the model name vLLM serves the base "
                                           "under (written as base_model_name_or_path)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Write a version as a plain PEFT directory, or as the LoRA directory vLLM loads."""
    registry = get_registry()
    if target is Target.peft:
        maintenance.export(registry, ref, directory, with_card=with_card)
        if as_json:
            print_json({"ref": ref, "path": str(directory), "target": "peft"})
        else:
            console.print(f"exported {ref} to {directory}")
        return
    from adapterhub_local.export.vllm_export import export_vllm

    result = export_vllm(registry, ref, directory, served_base=served_base)
    if as_json:
        print_json({"ref": result.ref, "path": str(result.path), "target": "vllm", "content_hash": result.content_hash,
                    "max_lora_rank": result.max_lora_rank, "notes": result.notes})
        return
    console.print(f"exported {result.ref} for vLLM to {result.path}")
    for note in result.notes:
        console.print(f"  - {note}", highlight=False)
