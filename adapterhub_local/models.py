"""Loading registered base models and their tokenizers with transformers, offline, from the
registry's own copy of the weights (safetensors only).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from adapterhub_local import runtime
from adapterhub_local.decode_attention import use_decode_attention
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.registry.bases import BaseRecord

TASK_TYPES = ("causal_lm", "sequence_classification", "feature")


def _offline() -> None:
    # The weights are local; never let transformers reach for a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(record: BaseRecord) -> Any:
    """The base's tokenizer; decoder tokenizers without a pad token get EOS as pad."""
    _offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(record.path))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    record: BaseRecord,
    task_type: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a registered base for a task: ``causal_lm``, ``sequence_classification`` (a new head with
    ``num_labels`` outputs, which the adapter trains and stores) or ``feature`` (the bare backbone).

    ``dtype`` is a torch dtype or a precision name (``auto``, ``fp32``, ``bf16``, ``fp16``) resolved for
    ``device`` by :func:`adapterhub_local.runtime.base_dtype` — ``auto`` is bf16 where bf16 matmul is native.
    A causal LM loaded on a CPU attends with :data:`adapterhub_local.decode_attention.DECODE_ATTENTION` (``sdpa``
    but for the layout of one-token decode steps)."""
    _offline()
    if isinstance(dtype, str):
        dtype = runtime.base_dtype(dtype, str(device))
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = str(record.path)
    if task_type == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    elif task_type == "sequence_classification":
        if not num_labels:
            raise UnsupportedError("sequence classification needs the number of labels", "pass num_labels")
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=num_labels)
        if getattr(model.config, "pad_token_id", None) is None:
            eos = getattr(model.config, "eos_token_id", None)
            model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    elif task_type == "feature":
        model = AutoModel.from_pretrained(path, dtype=dtype)
    else:
        raise UnsupportedError(f"unknown task type {task_type!r}", f"use one of {', '.join(TASK_TYPES)}")
    model.eval()
    module: torch.nn.Module = model
    module = module.to(device)
    if task_type == "causal_lm" and torch.device(device).type == "cpu":
        use_decode_attention(module)  # one-token steps in the packed GQA layout (decode_attention.py)
    return module
