"""Choosing the next token per row: greedy, temperature, top-k, top-p, repetition penalty, per-row seeds.

Greedy rows of a batch are decided together by one ``argmax``; sampled rows each use their own
``torch.Generator`` (seeded from the request's seed), so a seeded request draws the same tokens in any
batch. The processing order is Hugging Face's: repetition penalty, temperature, top-k, top-p.
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


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to ``-inf`` (one row ``[V]``)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator for a sampled row (seeded from the request, else from torch's global RNG)."""
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], history: list[torch.Tensor],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Pick one token per row from ``logits`` ``[B, V]`` (fp32). ``history[i]``: row i's token ids so far."""
    logits = logits.float()
    penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if penalised:
        logits = logits.clone()
        for i in penalised:
            logits[i] = repetition_penalty(logits[i], history[i], params[i].repetition_penalty)
    chosen = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.temperature == 0:
            continue
        row = filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen
