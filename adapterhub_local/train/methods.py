"""Methods: turn a loaded base model into the thing to train, and save what was trained.

* ``lora`` / ``qlora`` — PEFT LoRA (r, alpha, dropout, targets, rsLoRA, DoRA, init); QLoRA loads the base in
  4-bit NF4 through bitsandbytes (refused, before training, where bitsandbytes cannot run).
* ``prompt`` — PEFT prompt tuning (virtual tokens initialised randomly, from text, or from vocabulary).
* ``head_only`` — frozen backbone, trained classification head. Saved as a valid PEFT directory: the head
  in ``modules_to_save`` plus a rank-1 LoRA on one module whose B is zero and frozen (PEFT refuses a LoRA
  config with no target), so the adapter's effect is exactly "new head"; registered as kind ``head``.
* ``freeze_first_k`` / ``full`` — partial / full fine-tuning baselines. They change base tensors, so they
  cannot be a PEFT directory: the whole model is saved as a transformers directory (``config.json`` +
  ``model.safetensors``) and registered as kind ``full`` (``registry/model_kinds.py``).

LoRA inits are PEFT's own (``init_lora_weights``). PiSSA and OLoRA start from the weights' SVD / QR and *move
the base* (``W_res = W - scale·B0·A0``); the registry's contract is an adapter on the unchanged base, so the
initial ``A0``/``B0`` are kept (in memory) and :func:`save_result` has PEFT convert the trained adapter to
``ΔW = B·A - B0·A0`` — a plain LoRA of rank ``2r`` (``path_initial_model_for_weight_conversion``). EVA
initialises ``A`` from the SVD of the training inputs' activations (:func:`initialize_eva`, one pass over the
training batches before the first step; ``rho = 1`` keeps every module at rank ``r``, so checkpoints keep
their shapes); it does not move the base.

Classifier convention (shared with inference): LoRA + ``modules_to_save`` = the head module; the head reads
the pooling recorded on the card (``adapterhub_local/pooling.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.config import MUTATING_INITS, MethodConfig, Recipe
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.pooling import unwrap
from adapterhub_local.train import sharding

PEFT_METHODS = ("lora", "qlora", "prompt", "head_only")
FULL_METHODS = ("full", "freeze_first_k")
"""Methods whose result is a whole model (registry kind ``full``)."""

# Attention query/value per architecture: the LoRA paper's default choice.
DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
}
HEAD_NAMES = ("classifier", "score")


@dataclass
class Trainable:
    """The model to train and what the method means for saving it."""

    model: torch.nn.Module
    method: str
    is_peft: bool
    trainable_params: int
    total_params: int
    head: str | None = None
    note: str | None = None
    pooling: str = "native"
    """What the classification head reads (``native``, ``cls``, ``mean``, ``last``); recorded on the card."""
    initial: tuple[dict[str, torch.Tensor], Any] | None = None
    """PiSSA/OLoRA: the initial adapter state and its config (``init_lora_weights=True``), for the conversion."""


def model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "unknown"))


def recipe_targets(recipe: Recipe, base_path: Path) -> tuple[list[str], bool]:
    """The recipe's LoRA target module names (or the base architecture's default, read from its
    ``config.json``) and whether its weights are Conv1D (``fan_in_fan_out``, GPT-2)."""
    config = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    kind = str(config.get("model_type", ""))
    targets = recipe.method.target_modules or DEFAULT_TARGETS.get(kind)
    if not targets:
        raise UnsupportedError(f"no default LoRA targets for model type {kind!r}",
                               "set method.target_modules in the recipe")
    return list(targets), kind == "gpt2"


def default_targets(model: torch.nn.Module) -> list[str]:
    kind = model_type(model)
    if kind not in DEFAULT_TARGETS:
        raise UnsupportedError(f"no default LoRA targets for model type {kind!r}",
                               "set method.target_modules in the recipe")
    return list(DEFAULT_TARGETS[kind])


def head_module(model: torch.nn.Module) -> str:
    """The classification head's attribute name (``classifier`` for BERT, ``score`` for decoders)."""
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise UnsupportedError(f"cannot find the classification head of a {model_type(model)} model",
                           "use a model with a `classifier` or `score` head")


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _lora_config(method: MethodConfig, model: torch.nn.Module, task_type: str, head: str | None) -> Any:
    from peft import EvaConfig, LoraConfig

    init: bool | str = True if method.init == "default" else method.init
    return LoraConfig(
        r=method.r, lora_alpha=method.alpha,  # type: ignore[arg-type]  # PEFT accepts a float alpha
        lora_dropout=method.dropout,
        target_modules=method.target_modules or default_targets(model), use_rslora=method.use_rslora,
        use_dora=method.use_dora, init_lora_weights=init, task_type=task_type,  # type: ignore[arg-type]
        modules_to_save=[*([head] if head else []), *(method.modules_to_save or [])] or None,
        trainable_token_indices=list(method.trainable_tokens) if method.trainable_tokens else None,
        eva_config=EvaConfig(rho=1.0) if method.init == "eva" else None,
    )


def _prompt_config(method: MethodConfig, base_path: Path) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    init = {"random": PromptTuningInit.RANDOM, "text": PromptTuningInit.TEXT,
            "vocab": PromptTuningInit.SAMPLE_VOCAB}[method.prompt_init]
    return PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens, prompt_tuning_init=init,
        prompt_tuning_init_text=method.prompt_init_text if method.prompt_init == "text" else None,
        tokenizer_name_or_path=str(base_path) if method.prompt_init == "text" else None,
    )


def _layer_index(name: str) -> int | None:
    """The transformer block index in a parameter name (``encoder.layer.3.…`` / ``model.layers.3.…``)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def apply_method(model: torch.nn.Module, recipe: Recipe, base_path: Path) -> Trainable:
    """Wrap/freeze ``model`` for the recipe's method; base weights never receive gradients under PEFT methods."""
    from peft import get_peft_model

    method = recipe.method
    classification = recipe.task.type == "classification"
    task_type = "SEQ_CLS" if classification else "CAUSAL_LM"
    head = head_module(model) if classification else None
    note = None
    initial = None
    if method.name in ("lora", "qlora"):
        if method.name == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model)
        peft_model = get_peft_model(model, _lora_config(method, model, task_type, head))
        initial = _initial_adapter(peft_model) if method.init in MUTATING_INITS else None
    elif method.name == "prompt":
        peft_model = get_peft_model(model, _prompt_config(method, base_path))
    elif method.name == "head_only":
        from peft import LoraConfig

        targets = method.target_modules or default_targets(model)
        config = LoraConfig(r=1, lora_alpha=1, target_modules=targets[:1], layers_to_transform=[0],
                            init_lora_weights=True, task_type=task_type, modules_to_save=[head] if head else None)
        peft_model = get_peft_model(model, config)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(False)  # B is zero: the LoRA part contributes exactly nothing
        note = "backbone frozen; head in modules_to_save; the rank-1 LoRA on one module is zero and frozen"
    elif method.name in ("full", "freeze_first_k"):
        for name, param in model.named_parameters():
            layer = _layer_index(name)
            frozen = method.name == "freeze_first_k" and (
                "embeddings" in name or "embed_tokens" in name or (layer is not None and layer < method.k)
            )
            param.requires_grad_(not frozen)
        trainable, total = count_params(model)
        note = ("changes base tensors: saved as a whole transformers model (config.json + model.safetensors), "
                "registered as kind full")
        return Trainable(model, method.name, False, trainable, total, head, note)
    else:
        raise UnsupportedError(f"unknown method {method.name!r}", "use lora, qlora, prompt, head_only, "
                               "freeze_first_k or full")
    trainable, total = count_params(peft_model)
    if method.name in ("lora", "qlora") and method.init in MUTATING_INITS:
        note = (f"{method.init} init moved the base during training; the stored adapter is converted to a plain LoRA "
                f"of rank {2 * method.r} on the unchanged base (delta B·A - B0·A0)")
        return Trainable(peft_model, method.name, True, trainable, total, head, note, initial=initial)
    return Trainable(peft_model, method.name, True, trainable, total, head, note)


def _initial_adapter(peft_model: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """The freshly initialised adapter (``A0``, ``B0``) and a config that loads it without initialising again."""
    import copy

    from peft import get_peft_model_state_dict

    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    config = copy.deepcopy(peft_model.peft_config["default"])
    config.init_lora_weights = True  # PEFT's conversion refuses an initial adapter that would re-run the SVD
    return state, config


def initialize_eva(trained: Trainable, batches: Iterable[dict[str, torch.Tensor]]) -> None:
    """EVA: PEFT's ``initialize_lora_eva_weights`` over the training batches (input ids and attention masks
    only: classification labels are not token labels)."""
    from peft import initialize_lora_eva_weights

    device = next(trained.model.parameters()).device
    inputs = ({k: v.to(device) for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in batches)
    initialize_lora_eva_weights(trained.model, dataloader=list(inputs), show_progress_bar=False)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached whole copies of every trainable tensor (the state that checkpoints and best-model saving keep);
    sharded ones (FSDP) are gathered, so every process must call it."""
    return {n: sharding.full(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back into ``model`` (names must match exactly)."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise UnsupportedError(f"checkpoint holds tensors the model lacks: {missing[:3]}",
                               "resume with the same recipe that started the run")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(sharding.like(params[name], value))  # this process's shard of it under FSDP


def save_result(trained: Trainable, directory: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the trained result: a PEFT directory, or for full/partial fine-tunes the whole transformers model
    (``config.json`` + ``model.safetensors``, safetensors only, one file). ``state``: the trainable tensors in
    full (:func:`trainable_state`) where the model holds only shards of them (FSDP); PEFT picks the adapter's from
    it."""
    extra: dict[str, Any] = {} if state is None else {"state_dict": state}
    if state is not None and not trained.is_peft:
        raise UnsupportedError("a whole-model result cannot be saved from a trainable state alone",
                               "train a PEFT method under FSDP")
    directory.mkdir(parents=True, exist_ok=True)
    if trained.is_peft and trained.initial is not None:
        # PiSSA/OLoRA: PEFT loads the initial adapter from beside the output and subtracts it (rank 2r)
        initial = directory.parent / "initial_adapter"
        initial.mkdir(exist_ok=True)
        from safetensors.torch import save_file

        initial_state, config = trained.initial
        save_file(initial_state, str(initial / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(initial))
        trained.model.save_pretrained(str(directory), safe_serialization=True,  # type: ignore[operator]
                                      path_initial_model_for_weight_conversion=str(initial), **extra)
    elif trained.is_peft:
        trained.model.save_pretrained(str(directory), safe_serialization=True, **extra)  # type: ignore[operator]
    else:  # transformers writes safetensors only, in one file up to its 50 GB shard size
        unwrap(trained.model).save_pretrained(str(directory))  # type: ignore[operator]
    return directory
