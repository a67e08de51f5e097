"""Inference commands: ``generate``, ``predict`` and ``merge`` — argument parsing over the engine."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from adapterhub_local.cli.common import app, console, get_registry, print_json
from adapterhub_local.errors import ConfigError

_DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ConfigError([f"dtype {name!r} is not one of {', '.join(_DTYPES)}"], "pick one of those",
                          what="options")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _adapter_and_base(ref: str, base: str | None) -> tuple[str | None, str]:
    """``REF`` is an adapter reference, or ``base:NAME`` for the bare base."""
    registry = get_registry()
    if ref.startswith("base:"):
        return None, ref.removeprefix("base:")
    card = registry.resolve(ref)
    return card.ref, base or card.base


@app.command("generate")
def generate(
    ref: str = typer.Argument(..., help="Adapter reference (name, name@N, name:tag), or base:NAME for no adapter."),
    prompt: str = typer.Argument(..., help="The prompt text."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the weights (merge mode)."),
    base: str | None = typer.Option(None, "--base", help="Base to run on (default: the adapter's own base)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Upper bound on new tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="1.0 = off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1.0 = off."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    seed: int | None = typer.Option(None, help="Sampling seed."),
    chat: bool = typer.Option(False, "--chat", help="Format the prompt with the base's chat template."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is generated."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    decoder: str = typer.Option("auto", help="auto | dynamic | static | graph (CUDA graphs; auto picks it on cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Generate a completion with an adapter (swap mode, or merged with --merge)."""
    from adapterhub_local.inference import Engine, Request, SamplingParams

    adapter, base_name = _adapter_and_base(ref, base)
    engine = Engine(get_registry(), base_name, mode="merge" if merge else "swap", device=_device(device),
                    dtype=_dtype(dtype), decoder=decoder)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=list(stop), seed=seed)
    request = Request(prompt=prompt, adapter=adapter, sampling=params, chat=chat)
    if stream and not as_json:
        for event in engine.generate_stream([request]):
            typer.echo(event.text, nl=False)
        typer.echo()
        return
    result = engine.generate([request])[0]
    if as_json:
        print_json({"text": result.text, "adapter": result.adapter, "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason,
                    "merged": engine.merged})
    else:
        typer.echo(result.text)


@app.command("predict")
def predict(
    ref: str = typer.Argument(..., help="Adapter reference: a classifier (label + probabilities) or a generator."),
    text: str = typer.Argument(..., help="The input text."),
    base: str | None = typer.Option(None, "--base", help="Base to run on (default: the adapter's own base)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="For generation adapters."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Run an adapter on one input: classifiers print the label and probabilities, generators the completion."""
    from adapterhub_local.inference import Engine, Request, SamplingParams
    from adapterhub_local.train.restore import predict_full

    adapter, base_name = _adapter_and_base(ref, base)
    full = predict_full(get_registry(), adapter, text, max_new_tokens, _device(device)) if adapter else None
    if full is not None:  # a full fine-tune replaces the base's weights, so it runs alone, outside the engine
        if as_json:
            print_json(full)
        elif "label" in full:
            console.print(f"[bold]{full['label']}[/]")
            for label, p in sorted(full["probabilities"].items(), key=lambda kv: -kv[1]):
                console.print(f"  {label:<20} {p:.4f}")
        else:
            typer.echo(full["text"])
        return
    engine = Engine(get_registry(), base_name, device=_device(device))
    request = Request(prompt=text, adapter=adapter, sampling=SamplingParams(max_new_tokens=max_new_tokens))
    is_classifier = adapter is not None and engine.load(adapter).labels is not None
    if is_classifier:
        result = engine.classify([request])[0]
        if as_json:
            print_json({"label": result.label, "probabilities": result.probabilities, "adapter": result.adapter})
            return
        console.print(f"[bold]{result.label}[/]")
        for label, p in sorted(result.probabilities.items(), key=lambda kv: -kv[1]):
            console.print(f"  {label:<20} {p:.4f}")
        return
    completion = engine.generate([request])[0]
    if as_json:
        print_json({"text": completion.text, "adapter": completion.adapter,
                    "finish_reason": completion.finish_reason})
    else:
        typer.echo(completion.text)


@app.command("merge")
def merge(
    ref: str = typer.Argument(..., help="Adapter reference to merge."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged model (safetensors)."),
    base: str | None = typer.Option(None, "--base", help="Base to merge into (default: the adapter's own base)."),
    dtype: str = typer.Option("float32", help="Weights dtype of the written model."),
) -> None:
    """Write a standalone merged model (base + scale·B·A, computed in fp32) that plain transformers loads."""
    from adapterhub_local.inference.merge import export_merged

    path = export_merged(get_registry(), ref, out, base=base, dtype=_dtype(dtype))
    console.print(f"wrote merged model to {path}")
