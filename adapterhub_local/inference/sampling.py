"""Choosing the next token per row: greedy, temperature, top-k, top-p, repetition penalty, per-row seeds.

Greedy rows of a batch are decided together by one ``argmax``; sampled rows are filtered together, with
their parameters as per-row tensors (as LoRAX's heterogeneous warpers do), and each draws from its own
``torch.Generator`` (seeded from the request's seed), so a seeded request draws the same tokens in any batch.
The processing order is Hugging Face's: repetition penalty, temperature, top-k, top-p.

Fault containment: the sampler never raises for a row. Parameters are validated to ranges it handles
(:meth:`SamplingParams.problems`): with finite logits, ``(logits - max) / temperature`` lies in
``[-inf, 0]`` with at least one 0, top-k and top-p always keep the top token, so every sampled row's
distribution is finite and sums to one. A row whose logits are unusable (an adapter or a penalty that
overflows: any NaN or +inf, or nothing finite; ``-inf`` alone just masks a token) is reported in the
``ok`` mask instead, and its token is a harmless placeholder (id 0), so the decode loop can end that row
with an error and carry on with the others.
"""

from __future__ import annotations

import torch

from adapterhub_local.errors import ConfigError
from adapterhub_local.inference.types import SamplingParams


def check(params: SamplingParams) -> None:
    """Raise one :class:`ConfigError` listing every invalid field."""
    problems = params.problems()
    if problems:
        raise ConfigError(problems, "fix the sampling parameters", what="sampling parameters")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on one row: logits of ``seen`` token ids divided (if > 0) or multiplied (if < 0)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(0, seen, picked)


def filter_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to ``-inf``. ``logits`` ``[B, V]``; ``top_k``
    ``[B]`` long (0 = off); ``top_p`` ``[B]`` float (1.0 = off). The top token of every row always stays."""
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    k = top_k.clamp(min=0, max=vocab)
    k = torch.where(k == 0, torch.full_like(k, vocab), k)
    kth = sorted_logits.gather(1, (k - 1)[:, None])  # [B, 1]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # drop a token when the tokens before it already reach top_p (the top token always stays)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop_sorted[:, 0] = False
    drop_sorted &= (top_p < 1.0)[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """:func:`filter_rows` for one row ``[V]``."""
    k = torch.tensor([top_k], dtype=torch.long, device=logits.device)
    p = torch.tensor([top_p], dtype=torch.float32, device=logits.device)
    return filter_rows(logits[None], k, p)[0]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator for a sampled row (seeded from the request, else from torch's global RNG)."""
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], history: list[torch.Tensor],
                generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from ``logits`` ``[B, V]``. ``history[i]``: row i's token ids so far.

    Returns ``(tokens [B] long, ok [B] bool)``; a row with ``ok`` false had non-finite logits and its token
    is a placeholder (0) that the caller must not use."""
    logits = logits.float()
    penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            logits[i] = repetition_penalty(logits[i], history[i], params[i].repetition_penalty)
    # -inf (a masked token) is fine as long as something is finite; NaN or +inf is not
    ok = ~(torch.isnan(logits) | torch.isposinf(logits)).any(-1) & torch.isfinite(logits).any(-1)
    logits = torch.where(ok[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))  # [B, V]
    chosen = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if sampled:
        device = logits.device
        index = torch.tensor(sampled, dtype=torch.long, device=device)
        temperature = torch.tensor([params[i].temperature for i in sampled], dtype=torch.float32, device=device)
        top_k = torch.tensor([params[i].top_k for i in sampled], dtype=torch.long, device=device)
        top_p = torch.tensor([params[i].top_p for i in sampled], dtype=torch.float32, device=device)
        rows = logits.index_select(0, index)
        rows = (rows - rows.max(-1, keepdim=True).values) / temperature[:, None]  # in [-inf, 0], max 0
        probs = filter_rows(rows, top_k, top_p).softmax(-1)
        for j, i in enumerate(sampled):  # one draw per row: each row's own generator (its seed)
            chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return torch.where(ok, chosen, torch.zeros_like(chosen)), ok
