"""Understanding a PEFT adapter: its kind, rank, alpha and targets from ``adapter_config.json``, the
consistency of its tensors with that config, and the fit of every tensor to a base model's shapes.

PEFT names LoRA tensors ``base_model.model.<module path>.lora_A.weight`` (shape ``[r, in]``) and
``...lora_B.weight`` (shape ``[out, r]``), and with DoRA ``...lora_magnitude_vector`` (shape ``[out]``);
``modules_to_save`` copies (e.g. a classifier head) as
``base_model.model.<module path>.<param>``; a prompt-tuning adapter holds ``prompt_embeddings`` of shape
``[num_virtual_tokens * num_transformer_submodules, token_dim]``.

Checks collect every :class:`Problem` rather than stopping at the first, so one error (or one ``verify``
report) lists all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapterhub_local.errors import AdapterHubError, FormatError, ShapeMismatchError, UnsupportedError
from adapterhub_local.registry.peft_config import (
    HEAD_MODULES,
    SUPPORTED_TYPES,
    Problem,
    config_problems,
    pattern_value,
)
from adapterhub_local.registry.safetensors_check import TensorInfo

PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
EMBED_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
OUTPUT_LAYERS = ("lm_head", "embed_out", "output", "score", "classifier")
"""Module names of output layers (PEFT allows trainable tokens there too; the engine serves input rows only)."""
_RESAVE = "re-save the adapter with PEFT's save_pretrained"


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
    embedding_modules: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # path -> (r, vocab, hidden)
    token_modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> trainable-token rows (K, d)
    saved_modules: list[str] = field(default_factory=list)  # modules_to_save tensor names
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    task_type: str | None = None


def inspect(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> tuple[AdapterSummary | None, list[Problem]]:
    """Summarize a PEFT config plus tensor header and list every problem (summary is None when the
    adapter type itself is unknown or the config is unusable)."""
    problems = config_problems(config)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in SUPPORTED_TYPES:
        return None, problems
    if any(p.kind == "format" for p in problems):
        return None, problems
    task_type = config.get("task_type")
    if SUPPORTED_TYPES[peft_type.upper()] == "prompt":
        summary, more = _inspect_prompt(config, tensors, task_type)
    else:
        summary, more = _inspect_lora(config, tensors, task_type)
    return summary, problems + more


def _inspect_prompt(
    config: dict[str, Any], tensors: dict[str, TensorInfo], task_type: str | None
) -> tuple[AdapterSummary | None, list[Problem]]:
    info = tensors.get("prompt_embeddings")
    if info is None:
        return None, [Problem("prompt-tuning adapter without a 'prompt_embeddings' tensor", fix=_RESAVE)]
    problems: list[Problem] = []
    shape = info.shape
    n_virtual = int(config["num_virtual_tokens"])
    submodules = int(config.get("num_transformer_submodules") or 1)
    if len(shape) != 2 or shape[0] != n_virtual * submodules or shape[1] < 1:
        problems.append(Problem(f"prompt_embeddings shape {list(shape)} disagrees with num_virtual_tokens="
                                f"{n_virtual} × num_transformer_submodules={submodules}", fix=_RESAVE))
    token_dim = config.get("token_dim")
    if token_dim is not None and len(shape) == 2 and shape[1] != token_dim:
        problems.append(Problem(f"prompt_embeddings width {shape[1]} != token_dim {token_dim}", fix=_RESAVE))
    rest = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
    saved, head_problems = _saved_modules(rest, config)
    summary = AdapterSummary(kind="prompt", config=config, tensors=tensors, num_virtual_tokens=n_virtual,
                             token_dim=shape[-1] if shape else None, task_type=task_type, saved_modules=saved)
    return summary, problems + head_problems


def _inspect_lora(
    config: dict[str, Any], tensors: dict[str, TensorInfo], task_type: str | None
) -> tuple[AdapterSummary | None, list[Problem]]:
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    problems: list[Problem] = []
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    magnitudes: dict[str, tuple[int, ...]] = {}
    embeds: dict[str, dict[str, tuple[int, ...]]] = {}
    tokens: dict[str, tuple[int, ...]] = {}
    rest: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if not name.startswith(PEFT_PREFIX):
            problems.append(Problem(f"tensor {name!r} lacks PEFT's '{PEFT_PREFIX}' prefix", fix=_RESAVE))
            continue
        if name.endswith(MAGNITUDE_SUFFIX):
            magnitudes[name[len(PEFT_PREFIX) : -len(MAGNITUDE_SUFFIX)]] = info.shape
            continue
        if name.endswith(EMBED_SUFFIXES):
            embeds.setdefault(name[len(PEFT_PREFIX) : -len(EMBED_SUFFIXES[0])], {})[name[-1]] = info.shape
            continue
        if name.endswith(TOKENS_SUFFIX):
            tokens[name[len(PEFT_PREFIX) : -len(TOKENS_SUFFIX)]] = info.shape
            continue
        for suffix in LORA_SUFFIXES:
            if name.endswith(suffix):
                modules.setdefault(name[len(PEFT_PREFIX) : -len(suffix)], {})[suffix[1:7]] = info.shape
                break
        else:
            if ".lora_" in name:
                problems.append(Problem(f"tensor {name!r} (LoRA on a non-linear layer) cannot be served by the "
                                        "engine", "unsupported", "retrain with LoRA on linear layers"))
            else:
                rest[name] = info
    lora_modules: dict[str, tuple[int, int, int]] = {}
    rank_pattern = config.get("rank_pattern") or {}
    for path, pair in sorted(modules.items()):
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(Problem(f"module {path!r} has mismatched LoRA tensors (A {a}, B {b})",
                                    fix="each module needs lora_A [r, in] and lora_B [out, r] with the same r"))
            continue
        expected = pattern_value(rank_pattern, path, rank)
        if a[0] != expected:
            problems.append(Problem(f"module {path!r} has rank {a[0]} but the config says r={expected}",
                                    fix="fix r (or rank_pattern) in adapter_config.json to match the tensors"))
        lora_modules[path] = (a[0], a[1], b[0])
    embedding_modules, token_modules, more = _embedding_parts(embeds, tokens, config)
    problems += more
    problems += _magnitude_problems({k: v for k, v in magnitudes.items() if k not in embedding_modules},
                                    lora_modules, bool(config.get("use_dora", False)))
    if not modules and not embedding_modules and not token_modules and not rest and not problems:
        problems.append(Problem("LoRA adapter holds no lora_A/lora_B tensors", fix=_RESAVE))
    targets = config.get("target_modules") or []
    target_list = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    if not isinstance(targets, str) and target_list and "all-linear" not in target_list:
        for path in [*lora_modules, *embedding_modules]:
            if not any(path == t or path.endswith("." + t) for t in target_list):
                problems.append(Problem(f"module {path!r} has LoRA tensors but is not in target_modules "
                                        f"{target_list}", fix="fix target_modules in adapter_config.json"))
    saved, head_problems = _saved_modules(rest, config)
    summary = AdapterSummary(
        kind="lora", config=config, tensors=tensors, rank=rank, alpha=alpha, target_modules=sorted(target_list),
        lora_modules=lora_modules, saved_modules=saved, task_type=task_type,
        embedding_modules=embedding_modules, token_modules=token_modules,
    )
    return summary, problems + head_problems


def _embedding_parts(embeds: dict[str, dict[str, tuple[int, ...]]], tokens: dict[str, tuple[int, ...]],
                     config: dict[str, Any]) -> tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int]],
                                                      list[Problem]]:
    """Embedding LoRA (``lora_embedding_A`` ``[r, V]`` / ``_B`` ``[d, r]``) and trainable tokens (``[K, d]``, one
    row per id in ``trainable_token_indices``): shapes consistent with the config (the base fit comes later)."""
    problems: list[Problem] = []
    embedding_modules: dict[str, tuple[int, int, int]] = {}
    for path, parts in sorted(embeds.items()):
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            problems.append(Problem(f"embedding {path!r} has mismatched LoRA tensors (A {a}, B {b})",
                                    fix="an embedding LoRA holds lora_embedding_A [r, vocab] and _B [hidden, r]"))
            continue
        if bool(config.get("use_dora", False)):
            problems.append(Problem(f"DoRA on the embedding {path!r} is not served", "unsupported",
                                    "retrain with the embedding out of target_modules, or without use_dora"))
        expected = pattern_value(config.get("rank_pattern") or {}, path, config.get("r"))
        if a[0] != expected:
            problems.append(Problem(f"embedding {path!r} has rank {a[0]} but the config says r={expected}",
                                    fix="fix r (or rank_pattern) in adapter_config.json to match the tensors"))
        embedding_modules[path] = (a[0], a[1], b[0])
    token_modules: dict[str, tuple[int, int]] = {}
    spec = config.get("trainable_token_indices")
    for path, shape in sorted(tokens.items()):
        if path in embedding_modules:
            problems.append(Problem(f"{path!r} has both an embedding LoRA and trainable tokens", "unsupported",
                                    "train one of them on that embedding"))
        if path.rpartition(".")[2] in OUTPUT_LAYERS:
            problems.append(Problem(f"trainable tokens on the output layer {path!r} are not served (the engine adapts "
                                    "input-embedding rows per request)", "unsupported",
                                    "list trainable tokens on the input embedding only"))
            continue
        ids = spec if isinstance(spec, list) else next(
            (v for k, v in (spec or {}).items() if path == k or path.endswith("." + k)), None)
        if not isinstance(ids, list):
            problems.append(Problem(f"trainable tokens for {path!r} but trainable_token_indices does not name it",
                                    fix="fix trainable_token_indices in adapter_config.json"))
        elif len(shape) != 2 or shape[0] != len(ids):
            problems.append(Problem(f"trainable_tokens_delta of {path!r} is {list(shape)}, not one row per listed id "
                                    f"({len(ids)})", fix=_RESAVE))
        else:
            token_modules[path] = (shape[0], shape[1])
    if spec and not tokens:
        problems.append(Problem("trainable_token_indices is set but no trainable_tokens_delta is saved", fix=_RESAVE))
    return embedding_modules, token_modules, problems


def _magnitude_problems(magnitudes: dict[str, tuple[int, ...]], lora_modules: dict[str, tuple[int, int, int]],
                        use_dora: bool) -> list[Problem]:
    """DoRA: every LoRA module has a magnitude ``[out]`` and nothing else does (values: :func:`magnitude_keys`)."""
    problems: list[Problem] = []
    if magnitudes and not use_dora:
        problems.append(Problem(f"DoRA magnitudes for {sorted(magnitudes)[:3]} but use_dora is not true",
                                fix="set use_dora=true in adapter_config.json or re-save the adapter with PEFT"))
        return problems
    for path in sorted(set(magnitudes) - set(lora_modules)):
        problems.append(Problem(f"DoRA magnitude for {path!r}, which has no LoRA pair", fix=_RESAVE))
    if not use_dora:
        return problems
    for path, (_rank, _d_in, d_out) in sorted(lora_modules.items()):
        shape = magnitudes.get(path)
        if shape is None:
            problems.append(Problem(f"module {path!r} lacks its DoRA magnitude (use_dora=true)", fix=_RESAVE))
        elif tuple(shape) != (d_out,):
            problems.append(Problem(f"module {path!r}: DoRA magnitude {list(shape)} is not [{d_out}] (lora_B's "
                                    "rows)", fix=_RESAVE))
    return problems


def magnitude_keys(tensors: dict[str, TensorInfo]) -> list[str]:
    """The DoRA magnitude tensors of a state dict (their values must be finite and > 0: the admission checks)."""
    return sorted(k for k in tensors if k.endswith(MAGNITUDE_SUFFIX))


def _saved_modules(rest: dict[str, TensorInfo], config: dict[str, Any]) -> tuple[list[str], list[Problem]]:
    """``modules_to_save`` tensors: the engine runs exactly one linear head (classifier/score)."""
    if not rest:
        return [], []
    grouped: dict[str, dict[str, TensorInfo]] = {}
    for name, info in rest.items():
        module, _, param = name[len(PEFT_PREFIX):].rpartition(".") if name.startswith(PEFT_PREFIX) else ("", "", name)
        grouped.setdefault(module, {})[param] = info
    problems: list[Problem] = []
    declared = set(config.get("modules_to_save") or [])
    for module, params in sorted(grouped.items()):
        last = module.rpartition(".")[2]
        if module.endswith(".base_layer"):  # save_embedding_layers: the embedding an embedding LoRA adapted
            continue
        if last not in HEAD_MODULES:
            if not any(module == d or module.endswith("." + d) for d in declared):
                problems.append(Problem(f"tensors {sorted(params)} of module {module!r} are neither LoRA weights nor "
                                        "a module listed in modules_to_save", fix="add it to modules_to_save in "
                                        "adapter_config.json, or re-save the adapter with PEFT"))
            continue  # a full module copy: merge mode swaps it in (swap mode refuses it, with the reason)
        if last not in declared:
            problems.append(Problem(f"head {module!r} is saved but not listed in modules_to_save",
                                    fix="add it to modules_to_save in adapter_config.json"))
        elif set(params) - {"weight", "bias"} or "weight" not in params or len(params["weight"].shape) != 2:
            problems.append(Problem(f"head {module!r} is not a single linear layer ({sorted(params)})", "unsupported",
                                    "train the head as one nn.Linear"))
        elif "bias" in params and params["bias"].shape != params["weight"].shape[:1]:
            problems.append(Problem(f"head {module!r}: bias {list(params['bias'].shape)} does not match weight "
                                    f"{list(params['weight'].shape)}", fix=_RESAVE))
    if len([m for m in grouped if m.rpartition(".")[2] in HEAD_MODULES]) > 1:
        problems.append(Problem(f"several heads saved ({sorted(grouped)})", "unsupported", "keep one head"))
    return sorted(rest), problems


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


def fit_problems(summary: AdapterSummary, base_shapes: dict[str, tuple[int, ...]],
                 hidden_size: int | None) -> list[Problem]:
    """Every tensor (and target module) of the adapter that does not fit the base's shapes."""
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
        module_paths = {name[: -len(".weight")] for name in base_shapes if name.endswith(".weight")}
        for target in summary.target_modules:
            if target == "all-linear" or isinstance(summary.config.get("target_modules"), str):
                continue
            if not any(m == target or m.endswith("." + target) for m in module_paths):
                problems.append(f"target module {target!r} does not exist in the base")
    problems += _embedding_fit(summary, base_shapes)
    for name in summary.saved_modules:
        shape = summary.tensors[name].shape
        module, _, param = name[len(PEFT_PREFIX):].rpartition(".")
        if module.rpartition(".")[2] not in HEAD_MODULES:
            module = module.removesuffix(".base_layer")
            weight = find_base_weight(module, base_shapes)
            found = None if weight is None else weight[: -len("weight")] + param
            if found is None or found not in base_shapes:
                problems.append(f"modules_to_save copy {name!r} has no counterpart in the base (a tied LM head is not "
                                "stored on its own: untie it, or train LoRA instead of a head copy)")
            elif tuple(base_shapes[found]) != tuple(shape):
                problems.append(f"modules_to_save copy {name!r} {list(shape)} != the base's {list(base_shapes[found])}")
        elif name.endswith(".weight") and hidden_size is not None and len(shape) == 2 and shape[1] != hidden_size:
            problems.append(f"head weight {name!r} {list(shape)} does not take the base's hidden size {hidden_size}")
    return [Problem(p, "shape", "import it against the base it was trained on (see `adapterhub base list`)")
            for p in problems]


def _embedding_fit(summary: AdapterSummary, base_shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Embedding LoRA and trainable tokens against the base embedding's ``[vocab, hidden]``."""
    problems: list[str] = []
    for path, (_rank, vocab, hidden) in summary.embedding_modules.items():
        weight = find_base_weight(path, base_shapes)
        if weight is None or tuple(base_shapes[weight]) != (vocab, hidden):
            have = "missing" if weight is None else list(base_shapes[weight])
            problems.append(f"embedding {path!r}: adapter wants a {vocab}×{hidden} embedding, base has {have}")
    spec = summary.config.get("trainable_token_indices")
    for path, (_count, hidden) in summary.token_modules.items():
        weight = find_base_weight(path, base_shapes)
        if weight is None or len(base_shapes[weight]) != 2 or base_shapes[weight][1] != hidden:
            have = "missing" if weight is None else list(base_shapes[weight])
            problems.append(f"trainable tokens on {path!r}: rows of width {hidden}, base embedding {have}")
            continue
        ids = spec if isinstance(spec, list) else next(
            (v for k, v in (spec or {}).items() if path == k or path.endswith("." + k)), [])
        vocab = base_shapes[weight][0]
        if any(not 0 <= int(i) < vocab for i in ids):
            problems.append(f"trainable token ids {ids} fall outside the base's vocabulary (0 … {vocab - 1})")
    return problems


def raise_problems(problems: list[Problem], where: str) -> None:
    """Raise one error listing every problem; its class follows the gravest kind (unsupported > shape >
    format), its fix lists each distinct fix once."""
    if not problems:
        return
    kinds: dict[str, type[AdapterHubError]] = {
        "unsupported": UnsupportedError, "shape": ShapeMismatchError, "format": FormatError}
    cls = next(kinds[k] for k in ("unsupported", "shape", "format") if any(p.kind == k for p in problems))
    fixes = list(dict.fromkeys(p.fix for p in problems if p.fix))
    shown = "; ".join(p.text for p in problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
    raise cls(f"{where}: {shown}", "; ".join(fixes) or None)
