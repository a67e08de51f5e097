"""Turning a registry :class:`LoadedAdapter` into what the engine runs: LoRA pairs keyed by the engine
model's own module names (with their DoRA magnitudes), a soft prompt, and a classifier head (PEFT
``modules_to_save``).

PEFT names modules by the task model it trained (``bert.encoder…`` for a BERT classifier,
``model.layers…`` for Llama); the engine holds one model (a causal LM or a bare encoder), so module
paths are matched by dropping leading components until a module of the engine's model fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adapterhub_local.errors import FormatError, ShapeMismatchError, UnsupportedError
from adapterhub_local.inference.module_kinds import ModuleExtras, extra_keys, module_extras
from adapterhub_local.lora import MAGNITUDE_SUFFIX, PEFT_PREFIX, LoraPair, lora_pairs
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.store import LoadedAdapter

HEAD_MODULES = ("classifier", "score")
"""``modules_to_save`` names that are a classification head (BERT: ``classifier``, decoders: ``score``)."""


@dataclass
class Head:
    """A linear classification head: ``logits = pooled · Wᵀ + b``."""

    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor | None
    labels: list[str]
    pooling: str  # "native" | "cls" | "mean" | "last"

    def to(self, device: torch.device, dtype: torch.dtype) -> Head:
        bias = None if self.bias is None else self.bias.to(device, dtype)
        return Head(self.weight.to(device, dtype), bias, self.labels, self.pooling)


@dataclass
class PreparedAdapter:
    """An adapter ready for the engine (tensors on the host until the pool installs them)."""

    ref: str
    card: AdapterCard
    kind: str  # "lora" | "prompt"
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    """Engine-model module name → LoRA pair (raw A/B and scale, as stored)."""
    fan_in_fan_out: bool = False
    prompt: torch.Tensor | None = None  # [num_virtual_tokens, hidden]
    head: Head | None = None
    dtype: torch.dtype = torch.float32
    """The engine's dtype: LoRA pairs keep their stored dtype (merging computes ΔW in fp32 from them)
    and are cast to this when installed."""
    extras: ModuleExtras = field(default_factory=ModuleExtras)
    """Embedding LoRA, trainable tokens and full module copies (:mod:`module_kinds`)."""

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the adapter carries (its device footprint, unpadded)."""
        count = sum(p.a.numel() + p.b.numel() + (0 if p.magnitude is None else p.magnitude.numel())
                    for p in self.pairs.values())
        if self.prompt is not None:
            count += self.prompt.numel()
        if self.head is not None:
            count += self.head.weight.numel() + (0 if self.head.bias is None else self.head.bias.numel())
        count += self.extras.numel
        return count * torch.empty((), dtype=self.dtype).element_size()

    @property
    def is_dora(self) -> bool:
        return any(p.magnitude is not None for p in self.pairs.values())

    @property
    def rank(self) -> int | None:
        return max((p.rank for p in self.pairs.values()), default=None)


def match_module(path: str, names: set[str]) -> str | None:
    """The engine-model module for a PEFT module path (leading components dropped until one fits)."""
    parts = path.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in names:
            return candidate
    return None


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def prepare(loaded: LoadedAdapter, model: Any, dtype: torch.dtype) -> PreparedAdapter:
    """Check an adapter against the engine's model and convert it (host tensors, ``dtype``)."""
    card, config = loaded.card, dict(loaded.config)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type == "PROMPT_TUNING":
        return _prepare_prompt(loaded, model, dtype)
    if peft_type != "LORA":
        raise UnsupportedError(f"adapter {card.ref} is {peft_type}", "the engine runs LoRA and prompt-tuning adapters")
    if config.get("lora_bias") or config.get("bias", "none") != "none":
        raise UnsupportedError(f"adapter {card.ref} trains biases", "retrain it with bias='none'")
    names = {name for name, _ in model.named_modules()}
    prepared = PreparedAdapter(ref=card.ref, card=card, kind="lora", dtype=dtype,
                               fan_in_fan_out=bool(config.get("fan_in_fan_out", False)))
    prepared.extras = module_extras(card.ref, loaded.tensors, config, model, lambda p: match_module(p, names))
    missing: list[str] = []
    plain = {k: v for k, v in loaded.tensors.items() if not extra_keys(k, prepared.extras)}
    for path, pair in lora_pairs(plain, config).items():
        target = match_module(path, names)
        if target is None:
            missing.append(path)
            continue
        prepared.pairs[target] = LoraPair(target, pair.a, pair.b, pair.scale, pair.magnitude)
    if missing:
        raise ShapeMismatchError(f"adapter {card.ref}: modules {missing[:4]} are not in the base model",
                                 "use the base the adapter was trained on")
    rest = {k: v for k, v in plain.items()
            if ".lora_A." not in k and ".lora_B." not in k and not k.endswith(MAGNITUDE_SUFFIX)}
    prepared.head = _head(card, rest, dtype)
    return refuse_non_finite(prepared)


def refuse_non_finite(adapter: PreparedAdapter) -> PreparedAdapter:
    """Raise :class:`FormatError` unless every tensor of ``adapter`` is floating point and finite in the engine's
    dtype (a NaN, or a value that overflows the serving dtype, would poison every row that uses it — and,
    with the dense multi-LoRA op, its neighbours). Returns the adapter."""
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, pair in adapter.pairs.items():
        tensors += [(f"{name}.lora_A", pair.a), (f"{name}.lora_B", pair.b)]
        if pair.magnitude is not None:
            tensors.append((f"{name}.lora_magnitude_vector", pair.magnitude))
        if not torch.isfinite(torch.tensor(float(pair.scale))):
            raise FormatError(f"adapter {adapter.ref}: the LoRA scale of {name} is not finite ({pair.scale})",
                              "fix lora_alpha / r in adapter_config.json")
    if adapter.prompt is not None:
        tensors.append(("prompt_embeddings", adapter.prompt))
    tensors += adapter.extras.named_tensors()
    if adapter.head is not None:
        tensors.append(("head.weight", adapter.head.weight))
        if adapter.head.bias is not None:
            tensors.append(("head.bias", adapter.head.bias))
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            raise FormatError(f"adapter {adapter.ref}: tensor {name} is {tensor.dtype}, not floating point",
                              "re-save the adapter with PEFT")
        if not bool(torch.isfinite(tensor.to(adapter.dtype)).all()):
            raise FormatError(f"adapter {adapter.ref}: tensor {name} holds NaN or inf (in {adapter.dtype})",
                              "retrain or re-export the adapter; the registry's `verify` reports such files")
    for name, pair in adapter.pairs.items():
        if pair.magnitude is not None and not bool((pair.magnitude > 0).all()):
            raise FormatError(f"adapter {adapter.ref}: the DoRA magnitude of {name} holds values <= 0",
                              "retrain or re-export the adapter: magnitudes are positive norms")
    return adapter


def _prepare_prompt(loaded: LoadedAdapter, model: Any, dtype: torch.dtype) -> PreparedAdapter:
    card = loaded.card
    prompt = loaded.tensors.get("prompt_embeddings")
    if prompt is None:
        raise FormatError(f"adapter {card.ref} has no prompt_embeddings", "re-save it with PEFT")
    hidden = model.get_input_embeddings().weight.shape[1]
    if prompt.dim() != 2 or prompt.shape[1] != hidden:
        raise ShapeMismatchError(f"adapter {card.ref}: prompt embeddings {list(prompt.shape)} do not fit hidden "
                                 f"size {hidden}", "use the base the adapter was trained on")
    config: dict[str, Any] = dict(loaded.config)
    n_virtual = int(config.get("num_virtual_tokens") or prompt.shape[0])
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedError(f"adapter {card.ref} prompts an encoder-decoder", "use a decoder-only base")
    rest = {k: v for k, v in loaded.tensors.items() if k != "prompt_embeddings"}
    prepared = PreparedAdapter(ref=card.ref, card=card, kind="prompt", prompt=prompt[:n_virtual].to(dtype),
                               dtype=dtype, head=_head(card, rest, dtype))
    return refuse_non_finite(prepared)


def _head(card: AdapterCard, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Head | None:
    """The classification head among ``modules_to_save`` tensors (anything else is refused)."""
    if not tensors:
        return None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, param = _strip(key).rpartition(".")
        grouped.setdefault(module, {})[param] = value
    heads = {m: p for m, p in grouped.items() if m.rpartition(".")[2] in HEAD_MODULES}
    others = sorted(set(grouped) - set(heads))
    if others or len(heads) != 1:
        raise UnsupportedError(f"adapter {card.ref} saves modules {others or sorted(grouped)} the engine cannot run",
                               "the engine supports one linear head (classifier or score) in modules_to_save")
    (module, params), = heads.items()
    if set(params) - {"weight", "bias"} or "weight" not in params:
        raise UnsupportedError(f"adapter {card.ref}: head {module!r} is not a single linear layer ({sorted(params)})",
                               "train the head as one nn.Linear")
    weight = params["weight"].to(dtype)
    labels = list(card.labels or [f"LABEL_{i}" for i in range(weight.shape[0])])
    if len(labels) != weight.shape[0]:
        raise FormatError(f"adapter {card.ref}: card lists {len(labels)} labels but the head has {weight.shape[0]} "
                          "outputs", "fix the card's labels")
    pooling = str((card.extra or {}).get("pooling", "native"))
    bias = params.get("bias")
    return Head(weight, None if bias is None else bias.to(dtype), labels, pooling)

