"""The adapter parts that live on embeddings and whole modules, read from a PEFT state dict:

- **embedding LoRA** (``<embedding>.lora_embedding_A`` ``[r, V]``, ``.lora_embedding_B`` ``[d, r]``): PEFT's
  ``lora.Embedding``; ``y = W[id] + scale·B·A[:, id]``. Served per row in swap mode
  (:class:`~adapterhub_local.inference.multi_embedding.MultiEmbedding`) and merged as ``W + scale·(B·A)ᵀ``.
- **trainable tokens** (``<embedding>.token_adapter.trainable_tokens_delta`` ``[K, d]`` with the ids in the
  config's ``trainable_token_indices``): PEFT's ``TrainableTokensLayer`` *replaces* those embedding rows. Served
  per row in swap mode, merged by writing the rows (and restored bit for bit).
- **module copies** (``modules_to_save`` other than a classifier head, e.g. ``lm_head``): a full copy of the
  module. Merge mode swaps the copy in for the module (the original object is put back on unmerge, so the base
  is untouched, tied weights included). Swap mode refuses them: a per-row copy of an LM head is ``V·d``
  parameters per adapter (a SmolLM2 head is 28 M, ~1,700× a rank-16 q_proj LoRA) and a mixed batch would run
  one full head per distinct adapter; classifier heads (small) are served per row by
  :class:`~adapterhub_local.inference.adapters.Head` instead.

Everything the engine cannot serve exactly raises :class:`UnsupportedError` naming the reason and the fix;
the registry's import gate (:mod:`adapterhub_local.registry.peft_dir`) refuses the same adapters earlier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterhub_local.errors import FormatError, ShapeMismatchError, UnsupportedError
from adapterhub_local.lora import MAGNITUDE_SUFFIX, PEFT_PREFIX, LoraPair, lora_scale

EMBED_A, EMBED_B = ".lora_embedding_A", ".lora_embedding_B"
TOKENS = ".token_adapter.trainable_tokens_delta"
HEAD_MODULES = ("classifier", "score")


@dataclass
class TokenRows:
    """Trainable tokens of one embedding: the ids (``[K]``, long) and their new rows (``[K, d]``)."""

    ids: torch.Tensor
    rows: torch.Tensor


@dataclass
class ModuleExtras:
    """An adapter's embedding LoRAs, trainable tokens and module copies, keyed by engine-model module name."""

    embeddings: dict[str, LoraPair] = field(default_factory=dict)
    tokens: dict[str, TokenRows] = field(default_factory=dict)
    copies: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    """The state-dict keys these parts were read from (the rest are LoRA pairs or a head)."""
    tied_tokens: bool = False
    """Trainable tokens on an embedding tied to the LM head (PEFT changes the head's rows too)."""

    @property
    def empty(self) -> bool:
        return not (self.embeddings or self.tokens or self.copies)

    @property
    def numel(self) -> int:
        count = sum(p.a.numel() + p.b.numel() for p in self.embeddings.values())
        count += sum(t.rows.numel() for t in self.tokens.values())
        return count + sum(t.numel() for params in self.copies.values() for t in params.values())

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        out: list[tuple[str, torch.Tensor]] = []
        for name, pair in self.embeddings.items():
            out += [(f"{name}.lora_embedding_A", pair.a), (f"{name}.lora_embedding_B", pair.b)]
        out += [(f"{name}.trainable_tokens_delta", t.rows) for name, t in self.tokens.items()]
        out += [(f"{name}.{param}", t) for name, params in self.copies.items() for param, t in params.items()]
        return out

    @property
    def swap_refusal(self) -> str | None:
        """Why swap mode cannot serve these parts (``None``: it can)."""
        if self.copies:
            return (f"it replaces whole modules ({', '.join(sorted(self.copies))}) with full copies, which swap mode "
                    "does not serve per row (a full LM-head copy per adapter and per distinct adapter in a batch)")
        if self.tied_tokens:
            return ("its trainable tokens sit on an embedding tied to the LM head, whose rows PEFT changes too; swap "
                    "mode adapts the input side only")
        return None


def extra_keys(key: str, extras: ModuleExtras) -> bool:
    """Whether a state-dict key belongs to ``extras`` (not a LoRA pair or a head)."""
    return key in extras.keys


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def token_indices(config: dict[str, Any], module: str) -> list[int] | None:
    """The ids PEFT's config lists for trainable tokens on ``module`` (a list applies to the input embedding)."""
    spec = config.get("trainable_token_indices")
    if spec is None:
        return None
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for key, ids in spec.items():
            if module == key or module.endswith("." + str(key)):
                return [int(i) for i in ids]
    return None


def _tied(model: Any, embedding: nn.Module) -> bool:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embedding, "weight", None)
    return output is not None and weight is not None and getattr(output, "weight", None) is weight


def module_extras(ref: str, tensors: dict[str, torch.Tensor], config: dict[str, Any], model: Any,
                  resolve: Callable[[str], str | None]) -> ModuleExtras:
    """Read the embedding/module parts of a PEFT LoRA state dict (``resolve`` maps a PEFT module path to the
    engine model's module name). Raises :class:`UnsupportedError` / :class:`FormatError` for anything the
    engine cannot serve exactly."""
    extras = ModuleExtras()
    embed: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, torch.Tensor] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path = _strip(key)
        if path.endswith((EMBED_A, EMBED_B)):
            embed.setdefault(path[: -len(EMBED_A)], {})[path[-1]] = value
        elif path.endswith(TOKENS):
            tokens[path[: -len(TOKENS)]] = value
        elif ".lora_" in path or path.endswith(MAGNITUDE_SUFFIX) or "." not in path:
            continue
        else:
            owner, _, param = path.rpartition(".")
            owner = owner.removesuffix(".base_layer")  # PEFT's save_embedding_layers: the embedding under the LoRA
            if owner.rpartition(".")[2] in HEAD_MODULES:
                continue
            copies.setdefault(owner, {})[param] = value
        extras.keys.add(key)

    def target(path: str, what: str) -> tuple[str, nn.Module]:
        name = resolve(path)
        if name is None:
            raise ShapeMismatchError(f"adapter {ref}: {what} module {path!r} is not in the base model",
                                     "use the base the adapter was trained on")
        module = model.get_submodule(name)
        return name, getattr(module, "base", module)  # through a multi-adapter wrapper

    use_dora = bool(config.get("use_dora", False))
    rank_default = config.get("r")
    for path, parts in embed.items():
        name, module = target(path, "embedding-LoRA")
        if set(parts) != {"A", "B"}:
            raise FormatError(f"adapter {ref}: embedding {path!r} lacks lora_embedding_A or _B",
                              "re-save the adapter with PEFT")
        if not isinstance(module, nn.Embedding):
            raise UnsupportedError(f"adapter {ref}: {path!r} holds embedding-LoRA tensors but is a "
                                   f"{type(module).__name__}", "re-save the adapter with PEFT")
        if use_dora:
            raise UnsupportedError(f"adapter {ref}: DoRA on the embedding {path!r} is not served",
                                   "retrain with the embedding out of target_modules, or without use_dora")
        a, b = parts["A"], parts["B"]
        rank = int(a.shape[0])
        if a.dim() != 2 or b.dim() != 2 or tuple(a.shape) != (rank, module.num_embeddings) or tuple(b.shape) != (
                module.embedding_dim, rank):
            raise ShapeMismatchError(f"adapter {ref}: embedding LoRA A {list(a.shape)} / B {list(b.shape)} do not fit "
                                     f"the {module.num_embeddings}×{module.embedding_dim} embedding {path!r}",
                                     "use the base the adapter was trained on")
        alpha = _pattern(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank_default or rank))
        scale = lora_scale(float(alpha), rank, bool(config.get("use_rslora", False)))
        extras.embeddings[name] = LoraPair(name, a, b, scale)
    for path, rows in tokens.items():
        name, module = target(path, "trainable-token")
        if name in extras.embeddings:
            raise UnsupportedError(f"adapter {ref}: {path!r} has both an embedding LoRA and trainable tokens",
                                   "train one of them on that embedding")
        if not isinstance(module, nn.Embedding):
            raise UnsupportedError(f"adapter {ref}: trainable tokens on {path!r} (a {type(module).__name__}, not the "
                                   "input embedding) are not served", "list trainable tokens on the input embedding")
        ids = token_indices(config, path)
        if ids is None:
            raise FormatError(f"adapter {ref}: trainable tokens for {path!r} but no trainable_token_indices names it",
                              "fix trainable_token_indices in adapter_config.json")
        problem = token_problem(ids, tuple(rows.shape), module.num_embeddings, module.embedding_dim)
        if problem:
            raise FormatError(f"adapter {ref}: {path!r}: {problem}", "re-save the adapter with PEFT")
        extras.tokens[name] = TokenRows(torch.tensor(ids, dtype=torch.long), rows)
        extras.tied_tokens = extras.tied_tokens or _tied(model, module)
    for path, params in copies.items():
        name, module = target(path, "modules_to_save")
        weight = getattr(module, "weight", None)
        if set(params) == {"weight"} and isinstance(weight, torch.Tensor) and params["weight"].shape == weight.shape \
                and torch.equal(params["weight"].to(weight.device, weight.dtype), weight):
            continue  # a saved copy equal to the base (PEFT saves the embedding it adapted): nothing to serve
        own = dict(module.named_parameters(recurse=True)) | dict(module.named_buffers(recurse=True))
        if set(params) != {k for k in own if k in params} or set(params) != set(dict(module.named_parameters())):
            raise UnsupportedError(f"adapter {ref}: the copy of {path!r} holds {sorted(params)}, the module has "
                                   f"parameters {sorted(dict(module.named_parameters()))}",
                                   "re-save the adapter with PEFT (modules_to_save saves every parameter)")
        for param, value in params.items():
            if tuple(value.shape) != tuple(own[param].shape):
                raise ShapeMismatchError(f"adapter {ref}: {path}.{param} is {list(value.shape)}, the base's is "
                                         f"{list(own[param].shape)}", "use the base the adapter was trained on")
        extras.copies[name] = params
    return extras


def token_problem(ids: list[int], rows: tuple[int, ...], vocab: int | None, hidden: int | None) -> str | None:
    """What is wrong with trainable tokens ``ids`` and their rows' shape (``None``: nothing)."""
    if not ids:
        return "trainable_token_indices is empty"
    if len(set(ids)) != len(ids):
        return f"trainable_token_indices lists an id twice ({ids})"
    if min(ids) < 0 or (vocab is not None and max(ids) >= vocab):
        return f"trainable token ids {ids} fall outside the vocabulary (0 … {'?' if vocab is None else vocab - 1})"
    if len(rows) != 2 or rows[0] != len(ids) or (hidden is not None and rows[1] != hidden):
        return f"trainable_tokens_delta {list(rows)} is not [{len(ids)}, {hidden}] (one row per listed id)"
    return None


def _pattern(pattern: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default
