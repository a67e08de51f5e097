"""Fixed-shape decoding: a preallocated KV cache, masks and inputs in persistent buffers, and on CUDA the
decode step captured once as a CUDA graph and replayed every step.

Hugging Face's dynamic cache grows by concatenation, so every decode step allocates, and each of a 1B
model's ~400 small kernels is launched from Python: at 32 rows the GPU waits on the launches. Here a batch
of ``B`` rows decoding up to ``L`` columns gets a *slab*: transformers' ``StaticCache`` of
``[B', heads, L', head_dim]`` per layer (``L'`` and, when steps are captured, ``B'`` rounded up to buckets
so later batches reuse it), a ``[B', L']`` boolean key mask, and ``[B', 1]`` token and position buffers.
The prompt is prefilled eagerly into columns ``[0, P)``; step ``t`` writes column ``P + t`` for every row
(the cache's own device counter advances inside the step) after the host has set the inputs in place: the
sampled tokens copied into the token buffer, positions ``+= 1``, mask column ``P + t`` set.

Before each batch every multi-adapter module stages the batch's LoRA operands into buffers owned by the
slab (:meth:`MultiLoraLinear.stage`). With nothing in the step reading the host, the whole forward, LoRA
included, is captured once per slab and replayed (:class:`torch.cuda.CUDAGraph`); it is captured again only
when the staged buffers' shapes change (another rank or adapter-count bucket, LoRA rows or none) or a stack
was reallocated (:attr:`BatchContext.layout`).

Masks are 4-D (``[B', 1, q, L']``) and built here, so transformers' mask code only passes them through.
Under left padding every row's keys are its own real tokens; a padding *query* (prefill) attends to
itself alone so its values stay finite, and no real query ever attends to padding: each row sees exactly
what it sees alone. Extra bucket rows carry the pad token, no adapter, and only their own columns.

Works for decoder bases whose attention takes a 4-D mask (``sdpa``, ``eager`` and the CPU decode attention of
:mod:`adapterhub_local.decode_attention`) with a full-attention ``StaticCache`` (no sliding-window layers);
:func:`static_support` says why when a base does not qualify.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from adapterhub_local.decode_attention import IMPLEMENTATIONS
from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference.generation import RowState, Sampler, cache_keyword, last_position
from adapterhub_local.inference.multi_lora import BatchContext
from adapterhub_local.inference.serve_kinds import staged_modules
from adapterhub_local.inference.soft_prompt import Batch

log = logging.getLogger("adapterhub_local.inference")

DECODERS = ("auto", "dynamic", "static", "graph")
_MASKED_ATTENTION = ("sdpa", "eager", *IMPLEMENTATIONS)
LENGTH_BUCKET = 64
CAPTURE_AFTER_STEPS = 4
"""Batches decoding at most this many tokens run the static step eagerly: a capture costs more than it saves."""


_IDENTS = itertools.count(1)


def next_slab_ident() -> int:
    """A fresh id for a slab's staged operands, unique across every decoder of the process."""
    return next(_IDENTS)


def attention_mask(allowed: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """A boolean key mask in the form the attention takes: boolean for sdpa, additive floats for eager."""
    if not eager:
        return allowed
    blocked = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, blocked)


def bucket_rows(rows: int) -> int:
    """Rows rounded up to a power of two (decode is bound by weight bytes, so spare rows cost little)."""
    return 1 << max(0, rows - 1).bit_length()


def bucket_length(columns: int) -> int:
    """Cache columns rounded up to a multiple of :data:`LENGTH_BUCKET`."""
    return -(-columns // LENGTH_BUCKET) * LENGTH_BUCKET


def static_support(model: nn.Module) -> str | None:
    """``None`` when ``model`` can decode on a static cache, else the reason it cannot."""
    config: Any = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no config"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in _MASKED_ATTENTION:
        return f"its attention implementation {attention!r} does not take a 4-D mask (need sdpa or eager)"
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(text, "sliding_window", None):
        return f"it has non-full-attention layers ({', '.join(sorted(kinds))} / sliding window)"
    try:
        from transformers import StaticCache  # noqa: F401
    except ImportError:
        return "this transformers has no StaticCache"
    return None


def resolve_decoder(decoder: str, device: torch.device, model: nn.Module) -> str:
    """``auto``: ``graph`` on CUDA when the base supports a static cache, else ``dynamic`` (on CPUs the
    static cache only adds attention over padding columns; see ``benchmarks/serving.py``). An explicit
    ``static``/``graph`` the base or device cannot run is an error naming why."""
    if decoder not in DECODERS:
        raise UnsupportedError(f"unknown decoder {decoder!r}", f"use one of {', '.join(DECODERS)}")
    reason = static_support(model)
    if decoder == "auto":
        return "graph" if device.type == "cuda" and reason is None else "dynamic"
    if decoder in ("static", "graph") and reason is not None:
        raise UnsupportedError(f"the {decoder} decoder cannot run this base: {reason}", "use decoder='dynamic'")
    if decoder == "graph" and device.type != "cuda":
        raise UnsupportedError(f"CUDA graphs need a CUDA device, not {device.type}",
                               "use decoder='static' (same fixed-shape step, run eagerly) or 'dynamic'")
    return decoder


def resolve_continuous(decoder: str, device: torch.device, model: nn.Module) -> str:
    """How open batches (continuous batching) decode: ``auto`` takes the static slab
    (:mod:`slab_rows`) wherever the base supports a static cache, as ``graph`` on CUDA and ``static`` on
    CPUs, and falls back to ``dynamic`` only where it does not (sliding-window or non-full attention,
    attention that takes no 4-D mask: :func:`static_support`). An explicit decoder is kept."""
    resolved = resolve_decoder(decoder, device, model)
    if decoder != "auto":
        return resolved
    if static_support(model) is not None:
        return "dynamic"
    return "graph" if device.type == "cuda" else "static"


Step = Callable[[], torch.Tensor]


class GraphBackend(Protocol):
    """Captures a step once; the returned ``replay`` reruns it on the same buffers and refreshes ``output``."""

    def capture(self, step: Step) -> tuple[Callable[[], None], torch.Tensor]: ...


class CudaGraphs:
    """Captures steps as CUDA graphs (warm-up runs on a side stream first, as capture requires). Each graph
    keeps its own memory pool: slabs' graphs replay in any order, which a shared pool does not allow."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def capture(self, step: Step) -> tuple[Callable[[], None], torch.Tensor]:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = step()
        return graph.replay, output


@dataclass
class _Slab:
    """Everything one bucket shape's captured step reads and writes, at fixed addresses."""

    rows: int
    columns: int
    cache: Any
    tokens: torch.Tensor  # [rows, 1] long
    positions: torch.Tensor  # [rows, 1] long
    mask: torch.Tensor  # [rows, columns] bool: which key columns each row may attend to
    ident: int = 0
    """The slab's id: which staged operands the multi-adapter modules read."""
    replay: Callable[[], None] | None = None  # the captured step
    logits: torch.Tensor | None = None  # the captured step's output buffer
    captured_for: tuple[Any, ...] | None = None
    """(layout, staged shapes) at capture: the capture is valid while both are unchanged."""
    allocated: bool = False
    checked: bool = False


class StaticDecoder:
    """Decodes batches on bucketed static slabs, replaying a captured step when given a graph backend.

    Args:
        model: a decoder (``…ForCausalLM``) the multi-adapter modules are wrapped into.
        context: the model's :class:`BatchContext` (the decoder sets rows and static mode on it).
        graphs: how to capture and replay the step (:class:`CudaGraphs` on CUDA); ``None`` runs it eagerly.
        max_slabs: slabs kept (least recently used dropped); each holds a KV cache for its shape.
    """

    def __init__(self, model: nn.Module, context: BatchContext, graphs: GraphBackend | None = None,
                 max_slabs: int = 4) -> None:
        reason = static_support(model)
        if reason is not None:
            raise UnsupportedError(f"static decoding cannot run this base: {reason}", "use decoder='dynamic'")
        self.model: Any = model
        self.context = context
        self.graphs = graphs
        self.max_slabs = max_slabs
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eager_mask = (getattr(model.config, "_attn_implementation", None) or "eager") == "eager"
        self._cache_kw = cache_keyword(model)
        self._slabs: OrderedDict[tuple[int, int], _Slab] = OrderedDict()
        self.captures = 0
        """Graphs captured so far (each costs one warm-up and one capture of the step)."""

    # --------------------------------------------------------------- slabs
    def _slab(self, rows: int, columns: int) -> _Slab:
        """The slab for a batch: rows bucketed only when steps are captured (a graph per power of two; run
        eagerly, spare rows would be pure extra work), columns always (so similar batches reuse the cache)."""
        key = (bucket_rows(rows) if self.graphs is not None else rows, bucket_length(columns))
        slab = self._slabs.get(key)
        if slab is None:
            from transformers import StaticCache

            while len(self._slabs) >= self.max_slabs:
                _, dropped = self._slabs.popitem(last=False)
                for module in staged_modules(self.model):
                    module.unstage(dropped.ident)
            b, length = key
            slab = _Slab(rows=b, columns=length, cache=StaticCache(config=self.model.config, max_cache_len=length),
                         tokens=torch.zeros((b, 1), dtype=torch.long, device=self.device),
                         positions=torch.zeros((b, 1), dtype=torch.long, device=self.device),
                         mask=torch.zeros((b, length), dtype=torch.bool, device=self.device),
                         ident=next_slab_ident())
            self._slabs[key] = slab
        self._slabs.move_to_end(key)
        return slab

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return attention_mask(allowed, self.eager_mask, self.dtype)

    def _step(self, slab: _Slab) -> torch.Tensor:
        """One decode step on the slab's buffers: the function a CUDA graph captures."""
        mask = self._additive(slab.mask[:, None, None, :])
        out = self.model(input_ids=slab.tokens, attention_mask=mask, position_ids=slab.positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kw: slab.cache})
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def _stage(self, slab: _Slab, slots: list[int]) -> tuple[Any, ...]:
        """Every module stages the batch's operands into the slab's buffers; returns what a capture depends on."""
        shapes = tuple(module.stage(slab.ident, slots) for module in staged_modules(self.model))
        return (self.context.layout, shapes)

    def _capture(self, slab: _Slab, plan: tuple[Any, ...]) -> tuple[Callable[[], None], torch.Tensor]:
        """The slab's captured step and its output buffer, captured again unless the capture was made for the
        same layout and staged shapes."""
        assert self.graphs is not None
        if slab.replay is not None and slab.logits is not None and slab.captured_for == plan:
            return slab.replay, slab.logits
        slab.mask.fill_(True)  # warm-up steps attend somewhere; the prefill resets the cache and mask after
        slab.cache.reset()
        if not slab.allocated:  # allocate the cache on this stream (transformers does so on the first write)
            self._step(slab)
            slab.cache.reset()
            slab.allocated = True
        self.context.capturing = True
        try:
            slab.replay, slab.logits = self.graphs.capture(lambda: self._step(slab))
        finally:
            self.context.capturing = False
        slab.captured_for = plan
        self.captures += 1
        log.info("captured the decode step for %d rows x %d columns", slab.rows, slab.columns)
        return slab.replay, slab.logits

    # -------------------------------------------------------------- decode
    @torch.inference_mode()
    def decode(self, batch: Batch, states: list[RowState], slots: list[int], tokenizer: Any,
               eos: set[int]) -> Generator[list[tuple[int, str, int | None]], None, None]:
        """Run the batch to completion (the same contract as :func:`generation.decode`). ``slots``: each row's
        global adapter slot (0 = none); the modules stage their operands for them, padded to the slab."""
        rows, width = batch.rows, int(batch.input_ids.shape[1])
        steps = max(s.limit for s in states)
        slab = self._slab(rows, width + steps)
        plan = self._stage(slab, list(slots) + [0] * (slab.rows - rows))
        self.context.staged = slab.ident
        try:
            capture = self.graphs is not None and steps > CAPTURE_AFTER_STEPS
            replay = self._capture(slab, plan) if capture else None
            logits = self._prefill(slab, batch)
            sampler = Sampler(states, tokenizer, eos, self.device)
            for t in range(steps):
                tokens, step = sampler.step(logits[:rows])
                yield step
                if sampler.done:
                    return
                slab.tokens[:rows, 0].copy_(tokens)
                slab.positions.add_(1)
                slab.mask[:, width + t] = True
                if replay is not None:
                    replay[0]()
                    logits = replay[1]
                else:
                    logits = self._step(slab)
            raise AssertionError("a row outlived its token limit")  # every row finishes by its limit
        finally:
            self.context.staged = None
            self.context.clear()

    def _prefill(self, slab: _Slab, batch: Batch) -> torch.Tensor:
        """Write the prompts into columns ``[0, P)`` (eagerly) and set the buffers for the first step."""
        rows, width = batch.rows, int(batch.input_ids.shape[1])
        b, length = slab.rows, slab.columns
        real = torch.zeros((b, width), dtype=torch.bool, device=self.device)
        real[:rows] = batch.attention_mask.bool()
        query = torch.arange(width, device=self.device)
        causal = query[None, :] <= query[:, None]  # [q, k]
        allowed = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=self.device)[None]
        full = torch.zeros((b, 1, width, length), dtype=torch.bool, device=self.device)
        full[:, 0, :, :width] = allowed
        positions = torch.zeros((b, width), dtype=torch.long, device=self.device)
        positions[:rows] = batch.position_ids
        inputs: dict[str, torch.Tensor] = {}
        if batch.inputs_embeds is not None:
            embeds = batch.inputs_embeds
            inputs["inputs_embeds"] = torch.cat([embeds, embeds.new_zeros((b - rows, *embeds.shape[1:]))])
        else:
            ids = batch.input_ids
            inputs["input_ids"] = torch.cat([ids, ids.new_zeros((b - rows, width))])
        slab.cache.reset()
        out = self.model(**inputs, attention_mask=self._additive(full), position_ids=positions, use_cache=True,
                         logits_to_keep=last_position(self.device), **{self._cache_kw: slab.cache})
        if not slab.checked:  # once per slab (one host sync): the cache must keep its own write position
            if int(slab.cache.get_seq_length()) != width:
                raise UnsupportedError("this transformers' StaticCache does not advance its own write position, "
                                       "which the static decoder relies on",
                                       "upgrade transformers (5.x) or use decoder='dynamic'")
            slab.checked = True
        slab.mask.zero_()
        slab.mask[:, :width] = real
        slab.positions.copy_(positions[:, -1:])
        slab.tokens.zero_()
        logits: torch.Tensor = out.logits[:, -1]
        return logits
