"""``adapter_config.json`` as untrusted input: the type and range of every field this project reads, and
the PEFT features the engine cannot serve (refused at import, with the fix, instead of accepted and
broken later). DoRA (``use_dora``) is served; its magnitude tensors are checked in :mod:`peft_dir`.
Unknown fields are ignored — PEFT adds fields between releases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUPPORTED_TYPES = {"LORA": "lora", "PROMPT_TUNING": "prompt"}
HEAD_MODULES = ("classifier", "score")
"""``modules_to_save`` the engine runs: one linear classification head (BERT ``classifier``, decoders ``score``)."""


@dataclass(frozen=True)
class Problem:
    """One reason an adapter cannot be admitted. ``kind``: ``format`` (malformed), ``unsupported`` (valid
    PEFT the engine cannot serve) or ``shape`` (does not fit the base)."""

    text: str
    kind: str = "format"
    fix: str = ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and int(value) >= 1


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


def _positive_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and value > 0


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT ``rank_pattern``/``alpha_pattern`` lookup by module-path suffix (as the engine does it)."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def config_problems(config: dict[str, Any]) -> list[Problem]:
    """Every problem with a PEFT config's fields (empty list = the config is servable)."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in SUPPORTED_TYPES:
        return [Problem(f"peft_type {peft_type!r} is not supported", "unsupported",
                        "use a LoRA (peft_type LORA) or prompt-tuning (PROMPT_TUNING) adapter")]
    problems: list[Problem] = []
    for key in ("task_type", "base_model_name_or_path", "revision"):
        if config.get(key) is not None and not isinstance(config[key], str):
            problems.append(Problem(f"{key} must be a string, not {type(config[key]).__name__}",
                                    fix="fix adapter_config.json"))
    if SUPPORTED_TYPES[peft_type.upper()] == "prompt":
        return problems + _prompt_problems(config)
    return problems + _lora_problems(config)


def _prompt_problems(config: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    n_virtual = config.get("num_virtual_tokens")
    if not _positive_int(n_virtual):
        problems.append(Problem(f"num_virtual_tokens must be an integer >= 1, not {n_virtual!r}",
                                fix="fix adapter_config.json"))
    for key in ("token_dim", "num_attention_heads", "num_layers"):
        value = config.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            problems.append(Problem(f"{key} must be a positive integer, not {value!r}", fix="fix adapter_config.json"))
    submodules = config.get("num_transformer_submodules")
    if submodules is not None and (not _is_int(submodules) or submodules < 1):
        problems.append(Problem(f"num_transformer_submodules must be a positive integer, not {submodules!r}",
                                fix="fix adapter_config.json"))
    elif submodules not in (None, 1):
        problems.append(Problem(f"prompt tuning with num_transformer_submodules={submodules} (encoder-decoder)",
                                "unsupported", "train the soft prompt on a decoder-only or encoder base"))
    return problems


def _lora_problems(config: dict[str, Any]) -> list[Problem]:
    fix = "fix adapter_config.json (PEFT writes r as an integer and lora_alpha as a number)"
    problems: list[Problem] = []
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not _positive_int(rank):
        problems.append(Problem(f"r must be an integer >= 1, not {rank!r}", fix=fix))
    if not _positive_finite(alpha):
        problems.append(Problem(f"lora_alpha must be a finite number > 0, not {alpha!r}", fix=fix))
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not _str_list(targets):
        problems.append(Problem("target_modules must be a string or a list of module names", fix=fix))
    saved = config.get("modules_to_save")
    if saved is not None and not _str_list(saved):
        problems.append(Problem("modules_to_save must be a list of module names", fix=fix))
    for key in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            problems.append(Problem(f"{key} must be true or false, not {config[key]!r}", fix=fix))
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout <= 1):
        problems.append(Problem(f"lora_dropout must be a number in [0, 1], not {dropout!r}", fix=fix))
    for key, check, rule in (("rank_pattern", lambda v: _is_int(v) and v >= 1, "integers >= 1"),
                             ("alpha_pattern", _positive_finite, "finite numbers > 0")):
        pattern = config.get(key)
        if pattern is not None and (not isinstance(pattern, dict) or not all(
                isinstance(k, str) and k and check(v) for k, v in pattern.items())):
            problems.append(Problem(f"{key} must map module names to {rule}", fix=fix))
    problems.extend(_unsupported_lora(config))
    return problems


def _unsupported_lora(config: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    bias = config.get("bias", "none")
    if bias is not None and bias != "none":
        kind = "unsupported" if bias in ("all", "lora_only") else "format"
        problems.append(Problem(f"bias={bias!r}: the adapter trains biases, which the engine cannot serve", kind,
                                "retrain it with bias='none'"))
    if config.get("lora_bias") is True:
        problems.append(Problem("lora_bias=true: the adapter trains a bias on lora_B", "unsupported",
                                "retrain it with lora_bias=False"))
    problems.extend(_token_index_problems(config.get("trainable_token_indices")))
    for key, what in (("layer_replication", "layer replication"),
                      ("target_parameters", "LoRA on parameters"), ("megatron_config", "Megatron layers")):
        if config.get(key):
            problems.append(Problem(f"{key} is set: {what} cannot be served by the engine", "unsupported",
                                    f"retrain without {key}"))
    if config.get("use_qalora") is True:
        problems.append(Problem("use_qalora=true cannot be served by the engine", "unsupported",
                                "retrain it as plain LoRA"))
    return problems


def _token_index_problems(spec: Any) -> list[Problem]:
    """``trainable_token_indices``: a list of distinct ids >= 0 (the input embedding) or a map from module names to
    such lists (trainable tokens, served on input embeddings: :mod:`adapterhub_local.inference.module_kinds`)."""
    if spec is None:
        return []
    fix = "fix trainable_token_indices in adapter_config.json (a list of token ids, or module name -> list)"
    lists = spec.values() if isinstance(spec, dict) else [spec]
    if isinstance(spec, dict) and not all(isinstance(k, str) and k for k in spec):
        return [Problem("trainable_token_indices must map module names to token-id lists", fix=fix)]
    for ids in lists:
        if not isinstance(ids, list) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
            return [Problem(f"trainable_token_indices must list token ids >= 0, not {ids!r}", fix=fix)]
        if len(set(ids)) != len(ids):
            return [Problem(f"trainable_token_indices lists an id twice ({ids})", fix=fix)]
    return []
