"""The chunked per-token cross entropy equals torch's, in value and gradient, and never stores n × vocab in fp32."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from adapterhub_local.train import chunked_ce
from adapterhub_local.train.chunked_ce import cross_entropy_per_token


def _case(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    weights = torch.rand(rows, generator=generator) + 0.5  # an upstream gradient that is not all ones
    return logits, targets, weights


def _value_and_grad(fn: object, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.clone().requires_grad_()
    loss = fn(x, targets)  # type: ignore[operator]
    (loss * weights).sum().backward()
    assert x.grad is not None
    return loss.detach(), x.grad


def _reference(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(x.float(), targets, reduction="none")


@pytest.mark.parametrize("rows", [1, 7, 40, 129])  # below, at and across several chunks (and a ragged last one)
@pytest.mark.parametrize("chunk", [1, 16, 1000])
def test_fp32_values_and_gradients_are_torchs(rows: int, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked_ce, "CPU_CHUNK_BYTES", chunk * 4 * 257)  # `chunk` rows of a 257-wide vocabulary
    assert chunked_ce.chunk_rows(257, torch.device("cpu")) == chunk
    logits, targets, weights = _case(rows, 257, torch.float32)
    loss, grad = _value_and_grad(cross_entropy_per_token, logits, targets, weights)
    ref_loss, ref_grad = _value_and_grad(_reference, logits, targets, weights)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_bf16_logits_give_fp32_losses_and_bf16_gradients_within_an_ulp() -> None:
    logits, targets, weights = _case(300, 4099, torch.bfloat16, seed=1)
    loss, grad = _value_and_grad(cross_entropy_per_token, logits, targets, weights)
    ref_loss, ref_grad = _value_and_grad(_reference, logits, targets, weights)  # fp32 maths on the same values
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6)


def test_under_cpu_autocast_it_matches_autocasts_own_cross_entropy() -> None:
    """The loop calls it under bf16 autocast, where torch's cross entropy runs in fp32 after copying the logits."""
    logits, targets, weights = _case(64, 1031, torch.bfloat16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad = _value_and_grad(cross_entropy_per_token, logits, targets, weights)
        ref_loss, ref_grad = _value_and_grad(lambda x, t: F.cross_entropy(x, t, reduction="none"), logits, targets,
                                             weights)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=8e-3, atol=1e-6)


def test_the_backward_keeps_no_fp32_copy_of_the_logits() -> None:
    """What autograd saves: the logits as they came (bf16), the targets and one fp32 number per row."""
    logits, targets, _ = _case(50, 2048, torch.bfloat16, seed=3)
    saved: list[tuple[torch.dtype, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.numel()))
        return t

    x = logits.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy_per_token(x, targets).sum().backward()
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= 50 * 2048]
    assert (torch.bfloat16, 50 * 2048) in saved and (torch.float32, 50) in saved


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match=r"\[n, vocab\] logits and \[n\] targets"):
        cross_entropy_per_token(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="got"):
        cross_entropy_per_token(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))


def test_chunks_fit_the_cpu_cache_budget_and_are_bigger_elsewhere() -> None:
    assert chunked_ce.chunk_rows(49152, torch.device("cpu")) == 10
    assert chunked_ce.chunk_rows(10**9, torch.device("cpu")) == 1
    assert chunked_ce.chunk_rows(49152, torch.device("meta")) > 100
