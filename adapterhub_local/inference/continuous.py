"""Continuous (token-level) batching: an open decode batch that rows join and leave between steps.

    batch = engine.open_batch(max_rows=64)
    batch.join([request_a, request_b], keys=[1, 2])   # checked, adapters in place; prefilled by the next step
    while batch:
        events = batch.step()                          # one token per row (a joiner's first)
        batch.join([request_c], keys=[3])              # joins at the next step
        batch.leave(2)                                 # cancelled: gone now

Every event is a :class:`StreamEvent` whose ``index`` is the caller's key; a row's last event is
``finished`` with its :class:`GenerationResult`, and the row is gone from the batch on return, so a short
request never waits for a long one.

Two ways to hold the rows' keys and values. **On a static slab** (the default wherever the base supports a
static cache: :mod:`slab_rows`), each row holds a slot of one preallocated cache: joiners are prefilled on
their own into free slots while the live rows take their decode step, a finished or cancelled row frees its
slot at once, nothing is copied, and the fixed-shape step is replayed as a CUDA graph on GPUs. **On the
growing cache** (the fallback), as follows.

How the growing cache works (in the spirit of vLLM/LoRAX/S-LoRA iteration-level scheduling, on Hugging Face's
own KV cache). The cache is one padded tensor per layer, kept *right-aligned*: row ``i``'s real tokens fill its
last ``n_i`` columns, the columns before are zeros that the attention mask hides (:mod:`kv_rows`). A step
with joiners is one mixed forward, as vLLM mixes prefill and decode tokens: the live rows' pending tokens
and the joiners' prompts (soft-prompt virtual tokens and all, through the same :func:`build_batch` as the
one-shot path) are left-padded into one block after the cache, the joiners getting empty cache rows;
afterwards one gather per layer puts every row's real tokens back into a right-aligned run (the block
padding sat between a live row's cache and its new token). When that padding would exceed
``fuse_budget`` positions (long prompts joining many rows), the joiners are prefilled on their own and
stacked under the live rows instead, which skip that step. Rows that finish leave by row selection, and
the columns no live row needs are cut. Each row keeps its own sampling parameters and random stream
(seeded from its request; :class:`~adapterhub_local.inference.sampling.RowSampling`, per-row tensors
extended on join and selected on leave), its own positions (real tokens only) and its own adapter slot, so every row's
tokens are those it gets alone, whoever joins or leaves around it.

The per-row adapter index stays a device tensor in the model's :class:`BatchContext`; it is rewritten
only when the membership changes (or another engine call used the context in between), never read back
on the host by the multi-LoRA op. Every row is admitted to the pool's
:class:`~adapterhub_local.inference.rows.RowLedger` at join and released when its cache row is reclaimed,
when it leaves, or when the batch closes; the ledger holds live rows' adapters busy, so other engine work
between steps (classification, loading) never evicts them, and merging and unloading them are refused
until their rows are gone. A row whose logits go non-finite ends alone, with an error event
(:mod:`sampling`); the others carry on. Swap mode only (merge mode changes the weights under every row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from adapterhub_local.errors import UnsupportedError
from adapterhub_local.inference import kv_rows
from adapterhub_local.inference.generation import (
    NON_FINITE,
    RowState,
    advance,
    cache_keyword,
    cache_of,
    forward_cached,
)
from adapterhub_local.inference.sampling import RowSampling
from adapterhub_local.inference.slab_rows import SlabRows
from adapterhub_local.inference.soft_prompt import Row, build_batch
from adapterhub_local.inference.types import GenerationResult, Request, RowFailedError, StreamEvent

if TYPE_CHECKING:
    from adapterhub_local.inference.engine import Engine


@torch.inference_mode()
def editable_cache(model: Any, token: int, device: torch.device) -> bool:
    """Whether ``model`` builds a KV cache whose rows :mod:`kv_rows` can edit (one one-token forward)."""
    out = forward_cached(model, input_ids=torch.tensor([[token]], device=device))
    try:
        kv_rows.width(cache_of(out))
    except UnsupportedError:
        return False
    return True


@dataclass
class _Row:
    key: int
    ref: str | None
    lora: str | None
    """The ref when it is a LoRA adapter (held busy in the pool), else ``None``."""
    slot: int
    state: RowState
    length: int
    """Real tokens in the cache (virtual + prompt + fed generated tokens)."""
    pending: int = -1
    """The last chosen token, fed at the next step."""
    prompt: torch.Tensor | None = None
    """The soft prompt's virtual tokens (prefilled before the prompt), if any."""
    place: int = -1
    """Static slab mode: the row's slot in the slab."""

    def event(self, delta: str, token: int | None) -> StreamEvent:
        if self.state.error is not None:
            error = RowFailedError(self.state.error, "retry; if it recurs, check the adapter's weights with "
                                   "`adapterhub verify`")
            return StreamEvent(index=self.key, text="", token_ids=[], finished=True, error=error)
        result = None
        if self.state.finished:
            result = GenerationResult(text=self.state.text, token_ids=list(self.state.generated),
                                      prompt_tokens=len(self.state.prompt_ids),
                                      completion_tokens=len(self.state.generated),
                                      finish_reason=self.state.finish_reason or "length", adapter=self.ref)
        return StreamEvent(index=self.key, text=delta, token_ids=[] if token is None else [token],
                           finished=result is not None, result=result)


class OpenBatch:
    """A decode batch open to new rows between steps (see the module docstring). Not thread-safe by itself:
    every method takes the engine's lock, so call it from one thread (the scheduler's engine thread).

    Args:
        engine: the engine (swap mode).
        max_rows: most rows (live and waiting) at once.
        max_wait_steps: while rows decode, joiners wait up to this many decode steps so that they are
            prefilled together, one prefill per several steps (as TGI's ``max_waiting_tokens``); they go at
            once when the batch is empty or when they are at least as many as the live rows. 0: at once.
        fuse_budget: a prefill runs in one mixed forward with the live rows' decode while the live rows'
            padding, ``live rows × (longest joiner − 1)`` positions, stays within this budget; beyond it the
            joiners are prefilled on their own and the live rows skip that step. Padding costs compute per
            position, a separate forward costs a fixed overhead: on CPU with tiny models the separate prefill
            wins beyond a few dozen positions (measured with ``benchmarks/server_load.py``).
        slab: decode on this static slab (:mod:`slab_rows`: rows hold slots, joiners are prefilled on their
            own while the live rows decode, nothing is copied on join or leave, the step can be a CUDA graph);
            ``None``: on transformers' growing cache as described above (``fuse_budget`` applies only here).
    """

    def __init__(self, engine: Engine, max_rows: int = 64, max_wait_steps: int = 3, fuse_budget: int = 32,
                 slab: SlabRows | None = None) -> None:
        if max_rows < 1:
            raise UnsupportedError(f"max_rows must be >= 1 (got {max_rows})", "pass a positive max_rows")
        self.engine = engine
        self.runner = engine.runner
        self.max_rows = max_rows
        self.max_wait_steps = max_wait_steps
        self.fuse_budget = fuse_budget
        self._waited = 0  # decode steps taken while rows were waiting
        self.rows: list[_Row] = []
        self.waiting: list[_Row] = []
        """Joined, not yet prefilled (the next step prefills them)."""
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.steps = 0
        self._version = -1  # the BatchContext version our slots were written at
        self._ledger = engine.pool.rows
        self._id = self._ledger.new_batch()
        self._cache_kw = cache_keyword(self.runner.model)
        if slab is not None and not slab.claim(self):
            raise UnsupportedError("this static slab is in use by another open batch", "give each batch its own")
        self.slab = slab
        self._sampling: RowSampling | None = None
        """The sampling state of ``rows``, in order (extended on join, selected on leave)."""
        self._order = torch.zeros(0, dtype=torch.long)
        """Slab mode: the slots of ``rows``, in order (rebuilt only when the membership changes)."""

    # ----------------------------------------------------------------- facts
    def __len__(self) -> int:
        """Unfinished rows (decoding or waiting)."""
        return len(self.keys)

    def __bool__(self) -> bool:
        return bool(self.waiting) or any(not r.state.finished for r in self.rows)

    @property
    def keys(self) -> list[int]:
        """Keys of the unfinished rows (a finished row is gone for the caller, whether or not its cache row
        has been reclaimed yet)."""
        return [r.key for r in (*self.rows, *self.waiting) if not r.state.finished]

    def _refs(self, requests: list[Request]) -> list[str | None]:
        return self.engine.resolve_refs(requests)

    def fits(self, requests: list[Request]) -> bool:
        """Whether ``requests`` can join now: room in the batch, and their LoRA adapters fit the pool together
        with the live rows' (an empty batch always says yes: joining then reports what is wrong)."""
        with self.engine.exclusive():
            if not self:
                return len(requests) <= self.max_rows
            if len(self) + len(requests) > self.max_rows:
                return False
            pool = self.engine.pool
            wanted = {r.lora for r in (*self.rows, *self.waiting) if r.lora is not None}
            wanted |= {ref for ref in self._refs(requests) if ref is not None and pool.get(ref).kind == "lora"}
            return pool.fits_together(wanted)

    # ------------------------------------------------------------------ join
    def join(self, requests: list[Request], keys: list[int]) -> None:
        """Check ``requests``, put their adapters in place and queue them: the next :meth:`step` prefills them
        and yields their first tokens. Raises (adding nothing) if any request is invalid."""
        present = {r.key for r in (*self.rows, *self.waiting)}  # finished rows awaiting reclaim included
        if len(keys) != len(requests) or len(set(keys)) != len(keys) or set(keys) & present:
            raise UnsupportedError("join keys must be unique and one per request", "pass fresh keys")
        if not requests:
            return
        engine, runner = self.engine, self.runner
        with engine.exclusive():
            if not runner.is_causal:
                raise UnsupportedError(f"base {engine.base_name!r} is an encoder; it cannot generate text",
                                       "use classify() or a decoder base")
            if engine.mode == "merge" or engine.merged is not None:
                raise UnsupportedError("continuous batching needs swap or auto mode with nothing merged (the engine "
                                       f"is in {engine.mode} mode, merged: {engine.merged})",
                                       "engine.set_mode('swap'), or generate with engine.generate_stream")
            if len(self) + len(requests) > self.max_rows:
                raise UnsupportedError(f"the batch holds at most {self.max_rows} rows", "wait for rows to finish")
            refs = self._refs(requests)
            pool = engine.pool
            kinds = {ref: pool.get(ref).kind for ref in set(refs) if ref is not None}
            if engine.mode == "auto":  # the policy sees this traffic too (it may decide to merge: we then drain)
                engine.policy.observe(refs)
                engine.policy.decide({ref for ref, kind in kinds.items() if kind == "lora"})
            ids = [runner.encode(r) for r in requests]
            if any(len(i) == 0 for i in ids):
                raise UnsupportedError("a request has an empty prompt", "send at least one token")
            prompts = [None if ref is None else pool.get(ref).prompt for ref in refs]
            virtual = [0 if p is None else int(p.shape[0]) for p in prompts]
            states = []
            for k, request in enumerate(requests):
                used = virtual[k] + len(ids[k])
                if used >= engine.context_length:
                    raise UnsupportedError(f"a request needs {used} tokens; the context holds "
                                           f"{engine.context_length}", "shorten the prompt")
                states.append(RowState(params=request.sampling, prompt_ids=ids[k],
                                       limit=min(request.sampling.max_new_tokens, engine.context_length - used)))
            held = [r.lora for r in (*self.rows, *self.waiting) if r.lora is not None]
            slots = pool.acquire(held + [ref for ref in refs if ref is not None and kinds[ref] == "lora"])
            for k, ref in enumerate(refs):
                lora = ref if ref is not None and kinds[ref] == "lora" else None
                self._ledger.admit(self._id, keys[k], lora)
                self.waiting.append(_Row(
                    key=keys[k], ref=ref, lora=lora, slot=0 if lora is None else slots[lora], state=states[k],
                    length=virtual[k] + len(ids[k]), prompt=prompts[k]))

    # ------------------------------------------------------------------ step
    def step(self) -> list[StreamEvent]:
        """One token for every live row, or a prefill (each joiner's first token) with or without the live
        rows' decode (see ``max_wait_steps`` and ``fuse_budget``); finished rows leave before this returns."""
        if not self:
            return []
        with self.engine.exclusive(), torch.inference_mode():
            new: list[_Row] = []
            live = [r for r in self.rows if not r.state.finished]
            if self.waiting and (not live or len(self.waiting) >= len(live) or self._waited >= self.max_wait_steps):
                new, self.waiting, self._waited = self.waiting, [], 0
            elif self.waiting:
                self._waited += 1
            if self.slab is not None:
                return self._slab_step(new)
            finished = len(self.rows) - len(live)
            full = any(r.length >= self.engine.context_length for r in self.rows)
            if finished and (new or full or 2 * finished >= len(self.rows)):
                # Finished rows were answered at once; their cache rows are reclaimed together with the next
                # membership change (a prefill), once they are half the batch, or before one would run past
                # the context, so that most steps keep the batch's shape and per-row adapter index.
                self._remove({r.key for r in self.rows if r.state.finished})
            if new and self.rows and len(self.rows) * (max(r.length for r in new) - 1) > self.fuse_budget:
                events = self._forward([], new)  # prefill alone; the live rows wait for the next step
            else:
                events = self._forward(self.rows, new)
            self.steps += 1
            if not any(not r.state.finished for r in self.rows):
                self._remove({r.key for r in self.rows})
            return events

    def _forward(self, live: list[_Row], new: list[_Row]) -> list[StreamEvent]:
        """One forward over ``live`` rows (their pending token) and ``new`` rows (their whole prompt), left-padded
        into one block after the cache; then the cache is made right-aligned again."""
        runner = self.runner
        embeddings = runner.model.get_input_embeddings()
        device = embeddings.weight.device
        embeds = None
        if new:
            block = [Row([r.pending]) for r in live] + [Row(r.state.prompt_ids, r.prompt) for r in new]
            batch = build_batch(block, embeddings, runner.pad_id, left=True, slots=[r.slot for r in [*live, *new]])
            ids, block_mask, block_positions, embeds = (batch.input_ids, batch.attention_mask, batch.position_ids,
                                                        batch.inputs_embeds)
        else:  # a plain decode step
            ids = torch.tensor([[r.pending] for r in live], dtype=torch.long, device=device)
            block_mask, block_positions = torch.ones_like(ids), torch.zeros_like(ids)
        columns, width = int(ids.shape[1]), 0 if self.cache is None else kv_rows.width(self.cache)
        if live:
            assert self.mask is not None and live is self.rows
            pad = self.mask.new_zeros((len(new), width))
            mask = torch.cat([torch.cat([self.mask, pad]), block_mask], dim=1)
            kv_rows.add_empty_rows(self.cache, len(new))
        else:
            mask = block_mask
        offsets = torch.tensor([r.length for r in live] + [0] * len(new), dtype=torch.long, device=device)
        inputs: dict[str, Any] = {"attention_mask": mask, "position_ids": block_positions + offsets[:, None]}
        if embeds is not None:
            inputs["inputs_embeds"] = embeds
        else:
            inputs["input_ids"] = ids
        if live:
            inputs[self._cache_kw] = self.cache
        rows = [*live, *new]
        context = runner.context
        if new or context.version != self._version:
            context.set_rows([r.slot for r in rows])
            self._version = context.version
        out = forward_cached(runner.model, **inputs)
        cache = cache_of(out)
        if not live and self.rows:  # joiners prefilled on their own: stack them under the live rows
            kv_rows.drop_left(cache, columns - max(r.length for r in new))
            kv_rows.stack(self.cache, cache)
            self._version = -1
        else:
            self.cache = cache
        for row in live:
            row.length += 1
        if live and columns > 1:  # the live rows' block padding sits between their cache and their new token
            target = max(r.length for r in rows)
            shift = [width - target + 1] * len(live) + [width + columns - target] * len(new)
            index = (torch.arange(target)[None, :] + torch.tensor(shift)[:, None]).clamp(min=0)
            index[: len(live), -1] = width + columns - 1
            kv_rows.gather_columns(self.cache, index.to(device))
        logits = out.logits[:, -1]
        fresh = self._sampling_of(new, logits) if new else None
        if live:  # one forward over every row: the batch's sampling state covers them all
            assert self._sampling is not None
            if fresh is not None:
                self._sampling.extend(fresh)
            events = self._choose(rows, logits, self._sampling)[0]
        else:  # the joiners alone
            assert fresh is not None
            events = self._choose(rows, logits, fresh)[0]
            if self._sampling is None or not self.rows:
                self._sampling = fresh
            else:
                self._sampling.extend(fresh)
        self.rows = [*self.rows, *new]
        self._rebuild_mask()
        return events

    def _slab_step(self, new: list[_Row]) -> list[StreamEvent]:
        """Slab mode: the live rows' decode step and the joiners' prefill (each its first token); rows that
        finish leave at once (their slots are free for the next joiner)."""
        assert self.slab is not None
        live, parts = self.rows, []
        if live:
            parts.append(self.slab.decode(self._order))
        if new:
            embeddings = self.runner.model.get_input_embeddings()
            places, logits = self.slab.join([Row(r.state.prompt_ids, r.prompt) for r in new], [r.length for r in new],
                                            [r.length + r.state.limit for r in new], [r.slot for r in new],
                                            embeddings, self.runner.pad_id)
            for row, place in zip(new, places, strict=True):
                row.place = place
            parts.append(logits)
            fresh = self._sampling_of(new, logits)
            if self._sampling is None or not live:
                self._sampling = fresh
            else:
                self._sampling.extend(fresh)
            self.rows = [*live, *new]
            self._order = torch.tensor([r.place for r in self.rows], dtype=torch.long, device=self.slab.device)
        assert self._sampling is not None
        events, chosen = self._choose(self.rows, parts[0] if len(parts) == 1 else torch.cat(parts), self._sampling)
        self.slab.feed(self._order, chosen)
        self.steps += 1
        done = {r.key for r in self.rows if r.state.finished}
        if done:
            self._remove(done)
        return events

    @staticmethod
    def _sampling_of(rows: list[_Row], logits: torch.Tensor) -> RowSampling:
        return RowSampling([r.state.params for r in rows], [r.state.prompt_ids for r in rows], int(logits.shape[-1]),
                           logits.device)

    def _choose(self, rows: list[_Row], logits: torch.Tensor,
                sampling: RowSampling) -> tuple[list[StreamEvent], torch.Tensor]:
        """Pick each row's next token (``sampling``: the rows' state, in order), advance each unfinished row's
        text, and return its event (if it has news) and the chosen tokens (on the device, one per row; a
        finished row's is ignored)."""
        chosen, ok = sampling.choose(logits)
        events = []
        tokens, fine = torch.stack([chosen, ok.long()]).tolist()  # the one host sync per step
        for row, token, good in zip(rows, tokens, fine, strict=True):
            if row.state.finished:  # awaiting reclaim (growing cache only)
                continue
            if not good:  # this row alone ends; its cache row is reclaimed with the finished ones
                row.state.fail(NON_FINITE)
                row.pending = int(token)  # the placeholder: a valid id to feed until the row is reclaimed
                events.append(row.event("", None))
                continue
            before = len(row.state.generated)
            delta = advance(row.state, int(token), self.runner.tokenizer, self.runner.eos_ids)
            row.pending = int(token)
            new_token = int(token) if len(row.state.generated) > before else None
            if delta or new_token is not None or row.state.finished:
                events.append(row.event(delta, new_token))
        return events, chosen

    # ----------------------------------------------------------------- leave
    def leave(self, key: int) -> bool:
        """Drop a row now (a cancelled request); returns whether it was still unfinished. A finished row
        awaiting reclaim is released too (so is every row, once no unfinished one is left)."""
        with self.engine.exclusive():
            present = any(r.key == key for r in (*self.rows, *self.waiting))
            unfinished = key in self.keys
            if present:
                self._remove({key})
            if not self:
                self._remove({r.key for r in (*self.rows, *self.waiting)})
        return unfinished

    def close(self) -> None:
        """Drop every row (releases their adapters); the batch can be used again afterwards."""
        with self.engine.exclusive():
            self._remove({r.key for r in (*self.rows, *self.waiting)})
            if self.slab is not None:
                self.slab.release(self)

    def _remove(self, keys: set[int]) -> None:
        gone = [r for r in (*self.rows, *self.waiting) if r.key in keys]
        self.waiting = [r for r in self.waiting if r.key not in keys]
        for row in gone:
            self._ledger.release(self._id, row.key)
        keep = [k for k, r in enumerate(self.rows) if r.key not in keys]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._sampling = None
        elif self._sampling is not None:
            self._sampling.select(torch.tensor(keep, dtype=torch.long, device=self._sampling.device))
        if self.slab is not None:  # slots go back on the free list: nothing is copied
            self.slab.free([r.place for r in self.rows if r.key in keys])
            self.rows = [self.rows[k] for k in keep]
            self._order = torch.tensor([r.place for r in self.rows], dtype=torch.long, device=self.slab.device)
            return
        self.rows = [self.rows[k] for k in keep]
        self._version = -1
        if not self.rows:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None
        kv_rows.select_rows(self.cache, torch.tensor(keep, dtype=torch.long, device=self.mask.device))
        kv_rows.drop_left(self.cache, kv_rows.width(self.cache) - max(r.length for r in self.rows))
        self._rebuild_mask()

    def _rebuild_mask(self) -> None:
        device = self.runner.model.get_input_embeddings().weight.device
        self.mask = kv_rows.right_aligned_mask([r.length for r in self.rows], kv_rows.width(self.cache), device)
