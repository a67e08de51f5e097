"""Choosing the next token per row: greedy, temperature, top-k, top-p, repetition penalty, per-row seeds.

Greedy rows of a batch are decided together by one ``argmax``; sampled rows are filtered together, with
their parameters as per-row tensors built once per batch membership (:class:`RowSampling`, as LoRAX's
heterogeneous warpers do), and each draws from its own counter-based random stream (seeded from the
request's seed), so a seeded request draws the same tokens in any batch, with no loop over rows.
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


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL penalty on a batch: where ``seen`` (``[B, V]`` bool), logits divided by the row's ``penalty``
    (``[B]``) if > 0, multiplied if < 0 (Hugging Face's ``RepetitionPenaltyLogitsProcessor``)."""
    factor = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * factor, logits / factor), logits)


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """:func:`penalise` for one row ``[V]``; ``seen``: token ids."""
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    mask[seen] = True
    factor = torch.tensor([penalty], dtype=logits.dtype, device=logits.device)
    return penalise(logits[None], mask[None], factor)[0]


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


_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's constants, as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 in [0, 1): draw ``counters[i]`` of the stream seeded ``seeds[i]`` (splitmix64, a
    counter-based generator: any row's draws depend on its seed and count only, never on its batch)."""
    z = seeds + (counters + 1) * _GOLDEN  # int64 arithmetic wraps, as splitmix64's does
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    z = z ^ _shift(z, 31)
    return _shift(z, 11).double() * 2.0 ** -53


class RowSampling:
    """A batch's sampling state as per-row device tensors, built once per batch membership (as LoRAX's
    heterogeneous warpers do): temperature, top-k, top-p, repetition penalty, each row's seed and draw count,
    and a ``[B, V]`` mask of the tokens each row has seen (only when a row has a penalty). A step is a fixed
    number of batched tensor ops whatever the rows' parameters; no Python loop over rows.

    A sampled row draws by inverting its distribution's CDF at the next uniform of its own counter-based
    stream (:func:`uniforms`), so a seeded request samples the same tokens in any batch.
    """

    def __init__(self, params: list[SamplingParams], history: list[list[int]], vocab: int,
                 device: torch.device) -> None:
        seeds = [p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()) for p in params]
        self.device = device
        self.vocab = vocab
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
        self.seeds = torch.tensor(seeds, dtype=torch.long, device=device)
        self.draws = torch.zeros(len(params), dtype=torch.long, device=device)
        self.sampled = any(p.temperature != 0 for p in params)
        self.filtered = any(p.temperature != 0 and (p.top_k != 0 or p.top_p < 1.0) for p in params)
        self.penalised = any(p.repetition_penalty != 1.0 for p in params)
        self.seen: torch.Tensor | None = None
        if self.penalised:
            self.seen = torch.zeros((len(params), vocab), dtype=torch.bool, device=device)
            for i, (p, ids) in enumerate(zip(params, history, strict=True)):
                if p.repetition_penalty != 1.0 and ids:
                    self.seen[i, torch.tensor(ids, dtype=torch.long, device=device)] = True

    def __len__(self) -> int:
        return int(self.seeds.shape[0])

    def select(self, keep: torch.Tensor) -> None:
        """Keep rows ``keep`` (``[n]`` long on the device), in that order (rows left the batch)."""
        for name in ("temperature", "top_k", "top_p", "penalty", "seeds", "draws"):
            setattr(self, name, getattr(self, name).index_select(0, keep))
        if self.seen is not None:
            self.seen = self.seen.index_select(0, keep)

    def extend(self, other: RowSampling) -> None:
        """Append ``other``'s rows (rows joined the batch)."""
        for name in ("temperature", "top_k", "top_p", "penalty", "seeds", "draws"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        if self.seen is not None or other.seen is not None:
            mine = self.seen if self.seen is not None else torch.zeros(
                (len(self) - len(other), self.vocab), dtype=torch.bool, device=self.device)
            theirs = other.seen if other.seen is not None else torch.zeros(
                (len(other), self.vocab), dtype=torch.bool, device=self.device)
            self.seen = torch.cat([mine, theirs])
        self.sampled |= other.sampled
        self.filtered |= other.filtered
        self.penalised |= other.penalised

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one token per row from ``logits`` ``[B, V]``; advances the rows' draw counts and seen tokens.

        Returns ``(tokens [B] long, ok [B] bool)``; a row with ``ok`` false had non-finite logits and its
        token is a placeholder (0) that the caller must not use."""
        logits = logits.float()
        if self.seen is not None:
            logits = penalise(logits, self.seen, self.penalty)
        # -inf (a masked token) is fine as long as something is finite; NaN or +inf is not. One reduction
        # decides both: a row's max is NaN when it holds a NaN, +inf when it holds +inf, -inf when nothing is
        # finite; its index is the greedy token (the first maximum, as ``argmax``). The separate isnan /
        # isposinf / isfinite / argmax passes over [B, V] cost a third of a SmolLM2-shape CPU decode step.
        top, chosen = logits.max(-1)
        ok = torch.isfinite(top)
        if self.sampled:
            logits = torch.where(ok[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
            greedy = self.temperature == 0
            temperature = torch.where(greedy, torch.ones_like(self.temperature), self.temperature)
            rows = (logits - logits.max(-1, keepdim=True).values) / temperature[:, None]  # in [-inf, 0], max 0
            probs = (filter_rows(rows, self.top_k, self.top_p) if self.filtered else rows).softmax(-1)
            cdf = probs.double().cumsum(-1)
            total = cdf[:, -1:]
            point = (uniforms(self.seeds, self.draws)[:, None] * total).minimum(torch.nextafter(total, 0 * total))
            drawn = torch.searchsorted(cdf, point, right=True)[:, 0].clamp(max=self.vocab - 1)
            chosen = torch.where(greedy, chosen, drawn)
            self.draws += (~greedy).long()
        tokens = torch.where(ok, chosen, torch.zeros_like(chosen))
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        return tokens, ok


def next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                history: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of :class:`RowSampling` for a batch seen once (``history[i]``: row i's tokens so far)."""
    return RowSampling(params, history, int(logits.shape[-1]), logits.device).choose(logits)
