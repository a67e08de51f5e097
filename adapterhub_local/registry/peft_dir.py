"""Understanding a PEFT adapter directory: its kind, rank, alpha and targets from
``adapter_config.json``, and a check of every tensor's shape against a base model's tensor shapes.

PEFT names LoRA tensors ``base_model.model.<module path>.lora_A.weight`` (shape ``[r, in]``) and
``...lora_B.weight`` (shape ``[out, r]``); ``modules_to_save`` copies (e.g. a classifier head) as
``base_model.model.<module path>.<param>``; a prompt-tuning adapter holds ``prompt_embeddings`` of shape
``[num_virtual_tokens * num_transformer_submodules, token_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub_local.errors import FormatError, ShapeMismatchError, UnsupportedError
from adapterhub_local.registry.formats import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TensorInfo,
    read_json,
    read_safetensors_header,
    refuse_pickle_dir,
)

PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
SUPPORTED_TYPES = {"LORA": "lora", "PROMPT_TUNING": "prompt"}


@dataclass
class AdapterSummary:
    """What an adapter directory is, read from its config and safetensors header."""

    kind: str  # "lora" | "prompt"
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    lora_modules: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # path -> (r, in, out)
    saved_modules: list[str] = field(default_factory=list)  # modules_to_save tensor names
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    task_type: str | None = None


def summarize_adapter_dir(directory: Path) -> AdapterSummary:
    """Read and check a PEFT adapter directory; raise :class:`FormatError` on anything malformed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"{directory} is not a directory", "give the path of a PEFT adapter directory")
    weights = directory / ADAPTER_WEIGHTS
    if not weights.exists():
        refuse_pickle_dir(directory)
        raise FormatError(
            f"{directory} has no {ADAPTER_WEIGHTS}",
            "a PEFT adapter directory holds adapter_model.safetensors and adapter_config.json",
        )
    config = read_json(directory / ADAPTER_CONFIG, "adapter config")
    tensors = read_safetensors_header(weights)
    return summarize(config, tensors, str(directory))


def summarize(config: dict[str, Any], tensors: dict[str, TensorInfo], where: str) -> AdapterSummary:
    """Summarize a PEFT config plus tensor header; ``where`` names the source in errors."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"{where}: adapter type {config.get('peft_type')!r} is not supported",
            "use a LoRA (peft_type LORA) or prompt-tuning (PROMPT_TUNING) adapter",
        )
    kind = SUPPORTED_TYPES[peft_type]
    task_type = config.get("task_type")
    if kind == "prompt":
        return _summarize_prompt(config, tensors, where, task_type)
    return _summarize_lora(config, tensors, where, task_type)


def _summarize_prompt(
    config: dict[str, Any], tensors: dict[str, TensorInfo], where: str, task_type: str | None
) -> AdapterSummary:
    if "prompt_embeddings" not in tensors:
        raise FormatError(f"{where}: prompt-tuning adapter without 'prompt_embeddings'", "re-save it with PEFT")
    shape = tensors["prompt_embeddings"].shape
    n_virtual = int(config.get("num_virtual_tokens") or 0)
    submodules = int(config.get("num_transformer_submodules") or 1)
    if len(shape) != 2 or n_virtual <= 0 or shape[0] != n_virtual * submodules:
        raise FormatError(
            f"{where}: prompt_embeddings shape {list(shape)} disagrees with num_virtual_tokens={n_virtual} "
            f"× num_transformer_submodules={submodules}",
            "re-save the adapter with PEFT so config and tensor agree",
        )
    return AdapterSummary(
        kind="prompt", config=config, tensors=tensors, num_virtual_tokens=n_virtual,
        token_dim=shape[1], task_type=task_type,
    )


def _summarize_lora(
    config: dict[str, Any], tensors: dict[str, TensorInfo], where: str, task_type: str | None
) -> AdapterSummary:
    rank = config.get("r")
    alpha = config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
        raise FormatError(f"{where}: LoRA config needs integer r >= 1 and numeric lora_alpha", "fix the config")
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    saved: list[str] = []
    for name, info in tensors.items():
        if not name.startswith(PEFT_PREFIX):
            raise FormatError(f"{where}: tensor {name!r} lacks PEFT's '{PEFT_PREFIX}' prefix", "re-save with PEFT")
        for suffix in LORA_SUFFIXES:
            if name.endswith(suffix):
                path = name[len(PEFT_PREFIX) : -len(suffix)]
                modules.setdefault(path, {})[suffix[1:7]] = info.shape
                break
        else:
            if ".lora_" in name:
                raise UnsupportedError(f"{where}: unsupported LoRA tensor {name!r}", "only LoRA on linear layers")
            saved.append(name)
    lora_modules: dict[str, tuple[int, int, int]] = {}
    for path, pair in sorted(modules.items()):
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise FormatError(
                f"{where}: module {path!r} has mismatched LoRA tensors (A {a}, B {b})",
                "each module needs lora_A [r, in] and lora_B [out, r] with the same r",
            )
        lora_modules[path] = (a[0], a[1], b[0])
    if not lora_modules:
        raise FormatError(f"{where}: LoRA adapter holds no lora_A/lora_B tensors", "re-save the adapter with PEFT")
    targets = config.get("target_modules") or []
    target_list = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    return AdapterSummary(
        kind="lora", config=config, tensors=tensors, rank=rank, alpha=float(alpha),
        target_modules=sorted(target_list), lora_modules=lora_modules, saved_modules=sorted(saved),
        task_type=task_type,
    )


def find_base_weight(module_path: str, base_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Find the base checkpoint's weight for a PEFT module path.

    The checkpoint may name modules with or without the task wrapper's prefix (``bert.encoder...`` vs
    ``encoder...``, ``model.layers...`` vs ``layers...``), so leading components are dropped or matched
    as a suffix until one name fits.
    """
    parts = module_path.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:]) + ".weight"
        if candidate in base_shapes:
            return candidate
    suffix = "." + module_path + ".weight"
    matches = [name for name in base_shapes if name.endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def check_against_base(
    summary: AdapterSummary, base_shapes: dict[str, tuple[int, ...]], hidden_size: int | None, base_name: str
) -> None:
    """Raise :class:`ShapeMismatchError` listing every tensor that does not fit the base."""
    problems: list[str] = []
    if summary.kind == "prompt":
        if hidden_size is not None and summary.token_dim != hidden_size:
            problems.append(f"prompt_embeddings width {summary.token_dim} != hidden size {hidden_size}")
    else:
        fan_in_fan_out = bool(summary.config.get("fan_in_fan_out", False))
        for path, (_rank, d_in, d_out) in summary.lora_modules.items():
            weight = find_base_weight(path, base_shapes)
            if weight is None:
                problems.append(f"module {path!r} does not exist in the base")
                continue
            shape = base_shapes[weight]
            expected = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
            if len(shape) != 2 or tuple(shape) != expected:
                problems.append(
                    f"module {path!r}: adapter wants a {expected[0]}×{expected[1]} weight, base has {list(shape)}"
                )
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ShapeMismatchError(
            f"adapter does not fit base {base_name!r}: {shown}",
            "import it against the base it was trained on (see `adapterhub base list`)",
        )
