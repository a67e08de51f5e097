"""Inference commands: ``generate``, ``predict`` and ``merge`` — argument parsing over the engine.

An adapter is put to work the way it was trained: its card's task spec (:mod:`adapterhub_local.task_spec`)
fills the prompt template with the input, adds the trained stop strings and drops the completion prefix
from the answer. ``--raw`` sends the input unchanged and returns the model's text as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from rich.markup import escape

from adapterhub_local import runtime
from adapterhub_local.cli.common import (
    app,
    check_device,
    console,
    err_console,
    get_registry,
    output_dir,
    print_json,
    verbose,
)
from adapterhub_local.errors import ConfigError
from adapterhub_local.task_spec import TaskSpec, spec_from_card

_DTYPES = ("auto", "float32", "bfloat16", "float16")
RAW_HELP = "Send the input unchanged: no template, no trained stop strings, the output as generated."


def _dtype(name: str, device: str | None = None) -> torch.dtype:
    """``auto``: bf16 where ``device`` multiplies bf16 natively (a GPU, or a CPU with AMX/AVX512-BF16), else fp32."""
    if name not in _DTYPES:
        raise ConfigError([f"dtype {name!r} is not one of {', '.join(_DTYPES)}"], "pick one of those",
                          what="options")
    if name == "auto":
        return runtime.base_dtype("auto", device)
    dtype: torch.dtype = getattr(torch, name)
    return dtype


@dataclass
class Target:
    """What a command runs: the adapter (``None`` = bare base), its base, and its task spec unless raw."""

    adapter: str | None
    base: str
    spec: TaskSpec | None

    def prompt(self, text: str) -> str:
        """The model input for ``text`` (the template applied, or the text itself)."""
        final = self.spec.apply_template(text) if self.spec is not None else text
        if verbose():
            err_console.print(f"model input: {escape(repr(final))}", highlight=False)
        return final

    def stops(self, extra: list[str]) -> list[str]:
        return [*(self.spec.stop if self.spec is not None else ()), *extra]

    def answer(self, text: str) -> str:
        return self.spec.clean_output(text) if self.spec is not None else text


def _target(ref: str, base: str | None, raw: bool) -> Target:
    """``REF`` is an adapter reference, or ``base:NAME`` for the bare base."""
    if ref.startswith("base:"):
        return Target(None, ref.removeprefix("base:"), None)
    card = get_registry().resolve(ref)
    spec = None if raw else spec_from_card(card.extra, card.recipe, card.labels, where=f"card of {card.ref}")
    return Target(card.ref, base or card.base, spec)


@app.command("generate")
def generate(
    ref: str = typer.Argument(..., help="Adapter reference (name, name@N, name:tag), or base:NAME for no adapter."),
    prompt: str = typer.Argument(..., help="The input: filled into the adapter's prompt template unless --raw."),
    raw: bool = typer.Option(False, "--raw", help=RAW_HELP),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapter into the weights (merge mode)."),
    base: str | None = typer.Option(None, "--base", help="Base to run on (default: the adapter's own base)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Upper bound on new tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
    top_p: float = typer.Option(1.0, "--top-p", help="1.0 = off."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1.0 = off."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable), besides the adapter's own."),
    seed: int | None = typer.Option(None, help="Sampling seed."),
    chat: bool = typer.Option(False, "--chat", help="Format the prompt with the base's chat template."),
    stream: bool = typer.Option(False, "--stream", help="Print text as it is generated."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the device multiplies it natively, else float32), "
                              "float32, bfloat16 or float16."),
    decoder: str = typer.Option("auto", help="auto | dynamic | static | graph (CUDA graphs; auto picks it on cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Generate a completion with an adapter (swap mode, or merged with --merge), in its trained format."""
    from adapterhub_local.inference import Engine, Request, SamplingParams

    target = _target(ref, base, raw)
    text = target.prompt(prompt)
    chosen = check_device(device)
    engine = Engine(get_registry(), target.base, mode="merge" if merge else "swap", device=chosen,
                    dtype=_dtype(dtype, chosen), decoder=decoder)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=target.stops(list(stop)), seed=seed)
    request = Request(prompt=text, adapter=target.adapter, sampling=params, chat=chat)
    if stream and not as_json:
        pieces = (event.text for event in engine.generate_stream([request]))
        for piece in target.spec.clean_stream(pieces) if target.spec is not None else pieces:
            typer.echo(piece, nl=False)
        typer.echo()
        return
    result = engine.generate([request])[0]
    if as_json:
        print_json({"text": target.answer(result.text), "adapter": result.adapter, "prompt": text,
                    "template_applied": target.spec is not None and target.spec.template is not None,
                    "stop": params.stop, "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason,
                    "merged": engine.merged})
    else:
        typer.echo(target.answer(result.text))


@app.command("predict")
def predict(
    ref: str = typer.Argument(..., help="Adapter reference: a classifier (label + probabilities) or a generator."),
    text: str = typer.Argument(..., help="The input: filled into the adapter's template unless --raw."),
    raw: bool = typer.Option(False, "--raw", help=RAW_HELP),
    base: str | None = typer.Option(None, "--base", help="Base to run on (default: the adapter's own base)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="For generation adapters."),
    device: str | None = typer.Option(None, help="torch device (default: cuda if available, else cpu)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the device multiplies it natively, else float32), "
                              "float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Run an adapter on one input: classifiers print the label and probabilities, generators the completion."""
    from adapterhub_local.inference import Engine, Request, SamplingParams
    from adapterhub_local.train.restore import predict_full

    target = _target(ref, base, raw)
    model_input = target.prompt(text)
    chosen = check_device(device)
    weights = _dtype(dtype, chosen)  # a bad --dtype is refused before anything loads
    registry = get_registry()
    full = (predict_full(registry, target.adapter, model_input, max_new_tokens, chosen)
            if target.adapter else None)
    if full is not None:  # a full fine-tune replaces the base's weights, so it runs alone, outside the engine
        if as_json:
            print_json(full if "text" not in full else {**full, "text": target.answer(full["text"])})
        elif "label" in full:
            console.print(f"[bold]{escape(str(full['label']))}[/]")
            for label, p in sorted(full["probabilities"].items(), key=lambda kv: -kv[1]):
                console.print(f"  {escape(label):<20} {p:.4f}", highlight=False)
        else:
            typer.echo(target.answer(full["text"]))
        return
    engine = Engine(registry, target.base, device=chosen, dtype=weights)
    request = Request(prompt=model_input, adapter=target.adapter,
                      sampling=SamplingParams(max_new_tokens=max_new_tokens, stop=target.stops([])))
    is_classifier = target.adapter is not None and engine.load(target.adapter).labels is not None
    if is_classifier:
        result = engine.classify([request])[0]
        if as_json:
            print_json({"label": result.label, "probabilities": result.probabilities, "adapter": result.adapter,
                        "input": model_input})
            return
        console.print(f"[bold]{escape(result.label)}[/]", highlight=False)
        for label, p in sorted(result.probabilities.items(), key=lambda kv: -kv[1]):
            console.print(f"  {escape(label):<20} {p:.4f}", highlight=False)
        return
    completion = engine.generate([request])[0]
    if as_json:
        print_json({"text": target.answer(completion.text), "adapter": completion.adapter, "prompt": model_input,
                    "finish_reason": completion.finish_reason})
    else:
        typer.echo(target.answer(completion.text))


@app.command("merge")
def merge(
    ref: str = typer.Argument(..., help="Adapter reference to merge."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged model (safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already holds files."),
    base: str | None = typer.Option(None, "--base", help="Base to merge into (default: the adapter's own base)."),
    dtype: str = typer.Option("float32", help="Weights dtype of the written model."),
) -> None:
    """Write a standalone merged model (base + scale·B·A, computed in fp32) that plain transformers loads."""
    from adapterhub_local.inference.merge import export_merged

    registry = get_registry()
    registry.resolve(ref)  # an unknown reference fails before anything is written or replaced
    with output_dir(out, force, "merge") as target:
        export_merged(registry, ref, target, base=base, dtype=_dtype(dtype))
    console.print(f"wrote merged model to {escape(str(out))}", highlight=False)
