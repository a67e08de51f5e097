"""Attention for a single query token on CPUs: the decode step of every generation loop.

transformers' ``sdpa`` attention gives a decode step of a grouped-query base (several query heads per
key/value head) to torch's kernel in one of two layouts. With a mask (a padded batch) it packs the query heads
of each key/value head into one block, ``[B, KVH, G, D]``; without one (no padding: the mask is dropped) it
passes ``enable_gqa`` with one query row per head, and torch's CPU flash kernel is then ~5× slower in bf16:
2.97 vs 0.56 ms a layer for SmolLM2-135M's shape (9 heads over 3, 32 rows × 100 keys, one thread, AMD EPYC
Zen 4), 0.43 vs 0.38 ms in fp32. In bf16 and fp16 the two layouts give bit-identical outputs up to a few
hundred keys (torch 2.13); a decode step of an unpadded batch was simply paying 5× for the same numbers.

:data:`DECODE_ATTENTION` is an attention implementation registered with transformers' ``AttentionInterface``
(its masks built by the ``sdpa`` mask builder) that always takes the packed layout for one query token on a
CPU: the same ``scaled_dot_product_attention`` call transformers makes for a masked batch. Everything else —
prefill, training, dropout, soft-capping, attention sinks, position biases, bases without grouped heads, other
devices — goes to ``sdpa`` unchanged, but for a padding-free training row (:mod:`.segment_attention`), which
both implementations hand to :func:`~.segment_attention.segment_attention`. :func:`use_decode_attention`
switches a loaded model to it. The name is not written into a saved ``config.json``, so a merged model saved
from such a model loads anywhere.

In bf16 the packed step goes to a C kernel where it applies (:func:`kernel_decode`, ``inference/kernels/
decode_attention.c``, built with the per-row LoRA kernel): per row and key/value head it scores every key in fp32,
takes the softmax over all of them at once and sums the values in fp32, rounding once at the end. torch's CPU
flash kernel spent ~1 ms a layer on this step (32 rows, 100 keys, cache out of L3), a quarter of the base's decode
step once its matmuls were prepacked; the kernel ~0.65 ms (scratch, AMD EPYC, one thread). Its answers are not
sdpa's bits: torch rounds the softmax weights to bf16 before the weighted sum, the kernel does not, and its mean
error against an fp64 reference is ~30 % lower (1.7e-4 vs 2.6e-4 at 100 keys; tests bound it by torch's). Each
row's answer depends on that row only. Everything the kernel does not take (other dtypes, per-head or additive
masks, autograd, tracing, ``ADAPTERHUB_CPU_KERNELS=off``) gets torch's packed call, with ``sdpa``'s bits.
Computing the step with two torch matmuls (fp32 softmax) was also tried: 25 % faster than torch's kernel at 100
keys, no faster at 256, and less accurate when the weights are rounded to bf16 before the weighted sum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub_local.segment_attention import SLOTS, TOKENS, segment_attention

DECODE_ATTENTION = "adapterhub_cpu_decode"
"""The registered implementation's name (as ``config._attn_implementation``): torch's packed call, ``sdpa``'s bits."""
KERNEL_ATTENTION = "adapterhub_cpu_decode_kernel"
"""The same with bf16 decode steps given to the C kernel where it applies (the serving engine's choice; training
and evaluation keep :data:`DECODE_ATTENTION`, so their numbers stay those of transformers' own stack)."""
IMPLEMENTATIONS = (DECODE_ATTENTION, KERNEL_ATTENTION)

_REPLACES = "sdpa"


def _single_token_cpu(query: torch.Tensor, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether this call is a plain decode step on a CPU (nothing the packed call would not honour)."""
    if query.shape[2] != 1 or query.device.type != "cpu" or dropout:
        return False
    return all(kwargs.get(name) is None for name in ("softcap", "s_aux", "position_bias")) and not kwargs.get(
        "output_attentions", False)


def _group_mask(mask: torch.Tensor, kv_heads: int, keys: int) -> torch.Tensor:
    """A ``[B|1, 1|H, 1, ≥keys]`` mask as ``[B|1, 1|KVH, 1|G, keys]``, matching the packed query."""
    mask = mask[..., :keys]
    if mask.shape[1] == 1:
        return mask
    return mask.reshape(mask.shape[0], kv_heads, mask.shape[1] // kv_heads, keys)


def _tracing() -> bool:
    """Whether a dispatch mode (``make_fx``, fake tensors) is recording torch ops: a foreign call would be lost."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
    except ImportError:  # a torch without this helper: assume the worst, keep to torch ops
        return True
    return _get_current_dispatch_mode() is not None


def kernel_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  scaling: float | None) -> torch.Tensor | None:
    """The C kernel's attention for a bf16 decode step (``kernels/decode_attention.c``), or ``None`` where it does
    not apply: another device or dtype, autograd, ``torch.compile`` or a dispatch mode recording ops, a query that
    is not contiguous, keys and values with different strides, a mask that is not boolean per row (``[B|1, 1, 1,
    ≥L]``), a row with no key to attend to, or no kernel here (``ADAPTERHUB_CPU_KERNELS=off``, no C compiler)."""
    from adapterhub_local.inference import cpu_lora_kernel  # not at import: the inference package imports models

    batch, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    tensors = (query, key, value) if mask is None else (query, key, value, mask)
    if (any(t.device.type != "cpu" for t in tensors)
            or {query.dtype, key.dtype, value.dtype} != {torch.bfloat16} or key.shape != value.shape
            or key.shape[0] != batch or key.stride() != value.stride() or key.stride(3) != 1
            or not query.is_contiguous()
            or (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
            or torch.compiler.is_compiling() or _tracing()):
        return None
    rows, row_stride = None, 0
    if mask is not None:
        if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] < keys
                or mask.shape[0] not in (1, batch)):
            return None
        rows = mask[:, 0, 0, :keys]
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        row_stride = rows.stride(0) if rows.shape[0] > 1 else 0
    function = cpu_lora_kernel.attention_function()
    if function is None:
        return None
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype)
    scores = torch.empty((heads // kv_heads) * keys, dtype=torch.float32)
    code = function(batch, kv_heads, heads // kv_heads, dim, keys, query.data_ptr(), key.data_ptr(),
                    value.data_ptr(), key.stride(0), key.stride(1), key.stride(2),
                    None if rows is None else rows.data_ptr(), row_stride,
                    dim ** -0.5 if scaling is None else scaling, out.data_ptr(), scores.data_ptr())
    return out if code == 0 else None


def packed_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  scaling: float | None, kernel: bool = False) -> torch.Tensor:
    """Attention of one query token per row with the query heads packed by key/value head: ``query [B, H, 1,
    D]``, ``key``/``value [B, KVH, L, D]``, ``mask`` boolean (True = attend) or additive, broadcastable to
    ``[B, H, 1, L]``. Returns ``[B, 1, H, D]``, the layout transformers' attention functions return. With
    ``kernel`` the C kernel answers where it applies (:func:`kernel_decode`), else torch's kernel does."""
    answer = kernel_decode(query, key, value, mask, scaling) if kernel else None
    if answer is not None:
        return answer
    batch, heads, _, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    grouped = None if mask is None else _group_mask(mask, kv_heads, keys)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=grouped, scale=scaling)  # [B, KVH, G, D]
    return out.reshape(batch, 1, heads, dim)


def decode_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, kernel: bool = False,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: the packed call for a CPU decode step of a grouped-query
    attention (the C kernel first with ``kernel``), else ``sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if SLOTS in kwargs:  # a padding-free training row (segment_attention.py)
        return segment_attention(module, query, key, value, kwargs.pop(SLOTS), kwargs.pop(TOKENS), dropout,
                                 scaling, **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    if not _single_token_cpu(query, dropout, kwargs) or kv_heads == heads or heads % kv_heads:
        result: tuple[torch.Tensor, None] = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                                   dropout=dropout, scaling=scaling, **kwargs)
        return result
    return packed_decode(query, key, value, attention_mask, scaling, kernel), None


def kernel_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:data:`KERNEL_ATTENTION`: :func:`decode_attention_forward` with the C kernel first."""
    return decode_attention_forward(module, query, key, value, attention_mask, dropout, scaling, True, **kwargs)


def register() -> None:
    """Register :data:`DECODE_ATTENTION` and :data:`KERNEL_ATTENTION` with transformers (idempotent): the functions
    and the sdpa mask builder."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
    AttentionInterface.register(KERNEL_ATTENTION, kernel_attention_forward)
    for name in IMPLEMENTATIONS:
        AttentionMaskInterface.register(name, sdpa_mask)


def use_decode_attention(model: nn.Module, kernel: bool = False) -> bool:
    """Switch a transformers model that attends with ``sdpa`` (or with the other of this module's two) to
    :data:`KERNEL_ATTENTION` if ``kernel``, else :data:`DECODE_ATTENTION`; True if it did. Models on other
    implementations (eager, flash, flex) or without the functional attention interface keep theirs."""
    config: Any = getattr(model, "config", None)
    setter = getattr(model, "set_attn_implementation", None)
    wanted = KERNEL_ATTENTION if kernel else DECODE_ATTENTION
    current = getattr(config, "_attn_implementation", None)
    if config is None or setter is None or current == wanted or current not in (_REPLACES, *IMPLEMENTATIONS):
        return False
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return False
    register()
    setter(wanted)
    return bool(config._attn_implementation == wanted)
