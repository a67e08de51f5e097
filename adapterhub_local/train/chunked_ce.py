"""Per-token cross entropy over a large vocabulary, computed a few rows at a time in fp32.

``F.cross_entropy`` on ``[n, vocab]`` bf16 logits under CPU autocast first copies all of them to fp32, runs the
log-softmax over that copy and keeps its fp32 output for the backward, whose zero-filled one-hot gradient, log-
softmax backward and cast back to bf16 each pass over ``n × vocab`` values again. On SmolLM2's 49,152-token vocabulary
(560 labelled tokens, one thread) that is ~0.3 s of a ~3.4 s training step: memory traffic, not arithmetic.

Here the forward keeps only each row's log-sum-exp (``n`` floats) and the backward rebuilds the softmax from the
logits the head produced anyway, both a chunk of rows at a time (a few MiB of fp32, so each chunk stays in cache),
and writes the gradient straight into the logits' dtype. The mathematics is the same — loss = logsumexp(x) − x[y],
gradient = softmax(x) − onehot(y), in fp32 — with fp32 rounding in a different order: losses agree with
``F.cross_entropy`` to ~1e-6 relative and bf16 gradients to the last bit for all but ~0.02 % of elements (one bf16
ulp). 2.5× faster for the loss's forward and backward on the shape above, and the ``n × vocab`` fp32 activation is
never stored.
"""

from __future__ import annotations

from typing import Any

import torch

CPU_CHUNK_BYTES = 2 << 20
"""fp32 bytes of one chunk on a CPU: a few rows of the vocabulary, resident in cache through each pass."""
DEVICE_CHUNK_BYTES = 256 << 20
"""On an accelerator, bigger chunks (fewer kernel launches); still far below the whole ``n × vocab`` in fp32."""


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk for a ``vocab``-wide row on ``device``."""
    budget = CPU_CHUNK_BYTES if device.type == "cpu" else DEVICE_CHUNK_BYTES
    return max(1, budget // (4 * max(vocab, 1)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):  # fp32 throughout, whatever autocast is on
            for start in range(0, logits.shape[0], rows):
                lse[start : start + rows] = torch.logsumexp(logits[start : start + rows].float(), dim=-1)
        picked = logits.gather(1, targets[:, None])[:, 0].float()
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return lse - picked

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, targets, lse = ctx.saved_tensors
        rows: int = ctx.rows
        out = torch.empty_like(logits)
        index = torch.arange(min(rows, logits.shape[0]), device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, logits.shape[0], rows):
                stop = min(start + rows, logits.shape[0])
                softmax = (logits[start:stop].float() - lse[start:stop, None]).exp_()
                softmax[index[: stop - start], targets[start:stop]] -= 1.0
                out[start:stop] = softmax.mul_(grad[start:stop, None])
        return out, None, None


def cross_entropy_per_token(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, targets, reduction="none")`` in fp32 (``[n]``) for ``[n, vocab]`` logits of any
    float dtype and valid class indices (no ignore index); the gradient comes back in the logits' dtype."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected [n, vocab] logits and [n] targets, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    result: torch.Tensor = _ChunkedCrossEntropy.apply(logits, targets, chunk_rows(logits.shape[1], logits.device))
    return result
