"""The engine's model: the frozen base, its tokenizer, the multi-adapter wrappers and the forward passes
(prompt logits, pooled classification) over padded batches.

A base whose checkpoint is a causal LM is loaded as one (it generates; classifier adapters read its
backbone's hidden states); any other base is loaded as the bare backbone (classification only).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from adapterhub_local.decode_attention import use_decode_attention
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference.adapters import Head, PreparedAdapter
from adapterhub_local.inference.merge import Merger
from adapterhub_local.inference.multi_lora import BatchContext, wrap
from adapterhub_local.inference.packed_linear import pack_linears, packed_bytes
from adapterhub_local.inference.serve_kinds import install_extras, refuse_swap, staged_modules, uninstall_extras
from adapterhub_local.inference.soft_prompt import Batch, Row, build_batch
from adapterhub_local.inference.types import Request
from adapterhub_local.lora import dora_factor
from adapterhub_local.models import load_base_model, load_tokenizer
from adapterhub_local.registry.bases import BaseRecord

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_checkpoint(record: BaseRecord) -> bool:
    config = json.loads((record.path / "config.json").read_text(encoding="utf-8"))
    return any(str(a).endswith(_CAUSAL_SUFFIXES) for a in config.get("architectures") or [])


class EngineModel:
    """Holds the model and runs batches; also the pool's installer (adapter tensors ↔ wrapper stacks)."""

    def __init__(self, record: BaseRecord, device: torch.device, dtype: torch.dtype,
                 lora_strategy: str = "auto") -> None:
        self.record = record
        self.device = device
        self.dtype = dtype
        self.is_causal = is_causal_checkpoint(record)
        model: Any = load_base_model(record, "causal_lm" if self.is_causal else "feature", dtype=dtype, device=device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if self.is_causal and device.type == "cpu":
            use_decode_attention(model, kernel=True)  # bf16 decode steps to the C kernel (decode_attention.py)
        self.packed_linears = pack_linears(model)
        """Base linears answering from a prepacked bf16 weight (CPU; 0 elsewhere, in fp32, or switched off:
        :mod:`packed_linear`)."""
        self.model: Any = model
        self.tokenizer: Any = load_tokenizer(record) if _has_tokenizer(record) else None
        self.context = BatchContext(device, strategy=lora_strategy)
        self.merger = Merger(model, on_swap=self._relayout)
        """Merge mode's merger (the engine's): it knows each weight's clean bytes while an adapter is merged."""
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        eos = getattr(config, "eos_token_id", None)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = getattr(config, "pad_token_id", None)
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self.backbone: Any = getattr(model, model.base_model_prefix, model) if self.is_causal else model

    @property
    def packed_weight_bytes(self) -> int:
        """Memory the prepacked copies of the base linears take (beside the weights themselves)."""
        return packed_bytes(self.model)

    def _relayout(self) -> None:
        """Modules were replaced (merge mode): captured CUDA graphs must be captured again."""
        self.context.layout += 1

    # ---------------------------------------------------------- installer
    def install(self, slot: int, adapter: PreparedAdapter) -> None:
        refuse_swap(adapter)  # before any part is placed
        for name, pair in adapter.pairs.items():
            b_scaled = (pair.b.to(torch.float32) * pair.scale).to(self.dtype)
            wrapper = wrap(self.model, name, self.context)
            dora_g = None
            if pair.magnitude is not None:  # DoRA: the factor is computed once, here, from the clean base weight
                clean = self.merger.clean_weight(name)  # (not a merged one, if an adapter is merged now)
                dora_g = (dora_factor(clean, pair, adapter.fan_in_fan_out) - 1).to(self.dtype)
            wrapper.install(slot, pair.a.to(self.device, self.dtype), b_scaled.to(self.device), dora_g)
        install_extras(self.model, self.context, slot, adapter, self.device, self.dtype)

    def uninstall(self, slot: int, adapter: PreparedAdapter) -> None:
        for name in adapter.pairs:
            wrap(self.model, name, self.context).uninstall(slot)
        uninstall_extras(self.model, self.context, slot, adapter)

    def stack_bytes(self) -> int:
        """Bytes held by every multi-adapter stack (padding and free slots included)."""
        return sum(w.stack_bytes for w in staged_modules(self.model))

    # -------------------------------------------------------------- inputs
    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the valid token ids are ``0 … vocab_size - 1``."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    def check_prompt(self, request: Request, where: str) -> None:
        """Raise :class:`UnsupportedError` for a malformed request (the engine API's caller mistakes): wrong
        types, both or neither of prompt and messages, an empty prompt, token ids outside the vocabulary."""
        prompt, messages = request.prompt, request.messages
        if request.adapter is not None and (not isinstance(request.adapter, str) or not request.adapter):
            raise UnsupportedError(f"{where}: adapter must be a reference string or None (got {request.adapter!r})",
                                   "pass e.g. adapter='name@1'")
        if prompt is not None and messages is not None:
            raise UnsupportedError(f"{where} has both prompt and messages", "send one of them")
        if prompt is None and messages is None:
            raise UnsupportedError(f"{where} has neither prompt nor messages", "send a prompt")
        if isinstance(prompt, list):
            if not prompt:
                raise UnsupportedError(f"{where} has an empty prompt", "send at least one token")
            if any(not isinstance(t, int) or isinstance(t, bool) for t in prompt):
                raise UnsupportedError(f"{where}: token ids must be integers", "pass a list of int token ids")
            vocab = self.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise UnsupportedError(f"{where}: token ids {bad[:4]} are outside the vocabulary (0 … {vocab - 1})",
                                       "encode the prompt with this base's tokenizer")
        elif prompt is not None and not isinstance(prompt, str):
            raise UnsupportedError(f"{where}: prompt must be a string or a list of token ids "
                                   f"(got {type(prompt).__name__})", "pass text or token ids")
        if messages is not None and (not isinstance(messages, list) or not messages or any(
                not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
                for m in messages)):
            raise UnsupportedError(f"{where}: messages must be a non-empty list of {{'role': str, 'content': str}}",
                                   "fix the chat messages")

    def encode(self, request: Request) -> list[int]:
        """Token ids of a request's prompt (chat-formatted where asked)."""
        if request.prompt is not None and request.messages is not None:
            raise UnsupportedError("a request has both prompt and messages", "send one of them")
        if isinstance(request.prompt, list):
            return [int(t) for t in request.prompt]
        if self.tokenizer is None:
            raise UnsupportedError(f"base {self.record.name!r} has no tokenizer", "send token ids as the prompt")
        messages = request.messages
        if messages is None and request.chat and request.prompt is not None:
            messages = [{"role": "user", "content": request.prompt}]
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise UnsupportedError(f"base {self.record.name!r} has no chat template",
                                       "send a plain prompt instead of chat messages")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if request.prompt is None:
            raise UnsupportedError("a request has neither prompt nor messages", "send a prompt")
        return list(self.tokenizer(request.prompt)["input_ids"])

    def batch(self, ids: list[list[int]], prompts: list[torch.Tensor | None], slots: list[int] | None = None) -> Batch:
        if any(len(i) == 0 for i in ids):
            raise UnsupportedError("a request has an empty prompt", "send at least one token")
        if any(p is not None for p in prompts) and not self.is_causal:
            raise UnsupportedError("soft prompts are supported on decoder bases only", "use a LoRA adapter")
        rows = [Row(i, p) for i, p in zip(ids, prompts, strict=True)]
        return build_batch(rows, self.model.get_input_embeddings(), self.pad_id, left=self.is_causal, slots=slots)

    @staticmethod
    def _inputs(batch: Batch) -> dict[str, torch.Tensor]:
        inputs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
        if batch.inputs_embeds is not None:
            inputs["inputs_embeds"] = batch.inputs_embeds
        else:
            inputs["input_ids"] = batch.input_ids
        return inputs

    # ------------------------------------------------------------ forwards
    @torch.inference_mode()
    def prompt_logits(self, ids: list[list[int]], prompts: list[torch.Tensor | None],
                      slots: list[int]) -> list[torch.Tensor]:
        batch = self.batch(ids, prompts, slots)
        self.context.set_rows(slots)
        try:
            logits = self.model(**self._inputs(batch), use_cache=False).logits
        finally:
            self.context.clear()
        return [logits[k, s: s + n].float().cpu() for k, (s, n) in
                enumerate(zip(batch.prompt_start, batch.prompt_len, strict=True))]

    @torch.inference_mode()
    def classify(self, ids: list[list[int]], prompts: list[torch.Tensor | None], slots: list[int],
                 heads: list[Head]) -> list[torch.Tensor]:
        """Per-row head logits (fp32, CPU) from the backbone's pooled hidden states."""
        batch = self.batch(ids, prompts, slots)
        self.context.set_rows(slots)
        try:
            out = self.backbone(**self._inputs(batch))
        finally:
            self.context.clear()
        hidden = out.last_hidden_state  # [B, L, H]
        pooler = getattr(out, "pooler_output", None)
        results: list[torch.Tensor] = []
        for k, head in enumerate(heads):
            pooled = self._pool(head.pooling, hidden[k], batch.attention_mask[k], pooler, k)
            device_head = head.to(hidden.device, hidden.dtype)
            logits = pooled @ device_head.weight.T
            if device_head.bias is not None:
                logits = logits + device_head.bias
            results.append(logits.float().cpu())
        return results

    def _pool(self, pooling: str, hidden: torch.Tensor, mask: torch.Tensor, pooler: torch.Tensor | None,
              k: int) -> torch.Tensor:
        real = mask.nonzero().flatten()
        if pooling == "native":
            pooling = "pooler" if (not self.is_causal and pooler is not None) else "last" if self.is_causal else "cls"
        if pooling == "pooler":
            assert pooler is not None
            return pooler[k]
        if pooling == "cls":
            return hidden[real[0]]
        if pooling == "last":
            return hidden[real[-1]]
        if pooling == "mean":
            return hidden[real].mean(0)
        raise UnsupportedError(f"unknown pooling {pooling!r}", "use native, cls, last or mean")


def _has_tokenizer(record: BaseRecord) -> bool:
    return any((record.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                      "tokenizer.model"))
