"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON or
server-sent events) and this server's ``/v1/classify``.

Each handler checks its request completely (model, parameters, context) before queueing it, so every
refusal has its own status and never touches a batch. Registry reads and tokenization run in worker
threads, never on the event loop. A non-streaming handler also watches its connection: if the client goes
before the answer is ready, the job is cancelled (its row leaves the batch at the next decode step).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from adapterhub_local.errors import AdapterHubError
from adapterhub_local.inference.types import GenerationResult, SamplingParams
from adapterhub_local.inference.types import Request as EngineRequest
from adapterhub_local.server.auth import require_public
from adapterhub_local.server.errors import ClientDisconnectedError, error_body, status_of
from adapterhub_local.server.prepare import Target
from adapterhub_local.server.scheduler import Job
from adapterhub_local.server.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyResult,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
    new_id,
    now,
)
from adapterhub_local.server.state import ServerState

log = logging.getLogger("adapterhub.server")


def _sampling(body: SamplingFields, target: Target, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_k=body.top_k,
                          top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                          stop=target.stops(body.raw, body.stop_list), seed=body.seed)


def _usage(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def build_router(state: ServerState) -> APIRouter:
    """The ``/v1`` routes bound to one server's state."""

    def guard(request: Request) -> None:
        require_public(state.config.auth, request)

    router = APIRouter(prefix="/v1", dependencies=[Depends(guard)])

    def queue(http: Request, target: Target, ids: list[int], sampling: SamplingParams, streaming: bool) -> Job:
        http.state.model = target.label(state.base.name)  # canonical: metric labels bounded by the registry
        return state.scheduler.submit(EngineRequest(prompt=ids, adapter=target.adapter, sampling=sampling),
                                      target.model, streaming)

    async def finish(http: Request, job: Job) -> GenerationResult:
        """The job's result — unless the client goes first: then the job is cancelled (its row leaves the batch
        at the next step and releases everything) and the handler ends without a response."""
        result = asyncio.ensure_future(state.scheduler.result(job))
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                job.cancelled.set()
                result.cancel()
        if not result.done() or result.cancelled():
            raise ClientDisconnectedError("the client disconnected before its answer was ready")
        return result.result()

    def account(target: Target, result: GenerationResult) -> None:
        state.metrics.tokens(target.label(state.base.name), result.prompt_tokens, result.completion_tokens)
        if target.adapter is not None:
            state.engine.usage.served(target.adapter, 1, result.prompt_tokens, result.completion_tokens)

    async def event_stream(job: Job, target: Target, raw: bool, first: Callable[[], dict[str, Any] | None],
                           chunk: Callable[[str, str | None], dict[str, Any]],
                           usage_chunk: Callable[[Usage], dict[str, Any]] | None) -> AsyncIterator[bytes]:
        stripper = target.stripper(raw)  # the adapter's completion prefix is format, not answer
        opening = first()
        if opening is not None:
            yield _sse(opening)
        try:
            # aclosing: a client that goes away closes this generator, and with it the job's stream, which
            # marks the job cancelled so the engine stops working for it.
            async with aclosing(state.scheduler.stream(job)) as events:
                async for event in events:
                    if event.finished:
                        assert event.result is not None
                        account(target, event.result)
                        yield _sse(chunk(stripper.feed(event.text) + stripper.flush(), event.result.finish_reason))
                        if usage_chunk is not None:
                            yield _sse(usage_chunk(_usage(event.result)))
                    elif event.text:
                        text = stripper.feed(event.text)
                        if text:
                            yield _sse(chunk(text, None))
        except AdapterHubError as exc:  # headers are sent: report in-band, as OpenAI does
            log.info("stream ended by an error", extra={"fields": {"model": target.model, "error": str(exc)}})
            yield _sse(error_body(str(exc), status_of(exc)[1]))
        except Exception as exc:  # a bug; the server stays up
            log.exception("stream failed", extra={"fields": {"model": target.model}})
            yield _sse(error_body(f"internal error ({type(exc).__name__}); see the server log", "server_error"))
        yield _sse("[DONE]")

    @router.get("/models")
    async def list_models() -> ModelList:
        loaded = await state.scheduler.call(lambda: {a.ref for a in state.engine.adapters()})
        return ModelList(data=await asyncio.to_thread(state.resolver.models, state.started, loaded))

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        target = await asyncio.to_thread(state.resolver.resolve, model_id)  # 404 / 409 with the usual messages
        loaded = await state.scheduler.call(lambda: {a.ref for a in state.engine.adapters()})
        for card in await asyncio.to_thread(state.resolver.models, state.started, loaded):
            if card.id == model_id:
                return card
        # a tag or sha256 reference: describe its version
        return ModelCard(id=model_id, created=state.started, root=str(target.adapter), parent=state.base.name,
                         kind="alias", loaded=target.adapter in loaded)

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, http: Request) -> CompletionResponse | StreamingResponse:
        target = await asyncio.to_thread(state.resolver.generative, body.model)  # registry reads: off the loop
        prompt = target.prompt_text(body.prompt_text, body.raw)
        ids = await asyncio.to_thread(state.prompts.text_ids, prompt)
        budget = state.prompts.budget(len(ids), target, body.max_tokens, state.config.completion_max_tokens)
        job = queue(http, target, ids, _sampling(body, target, budget), body.stream)
        cid, created = new_id("cmpl"), now()
        if body.stream:
            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

            def usage(u: Usage) -> dict[str, Any]:
                return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [], "usage": u.model_dump()}

            wants_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(event_stream(job, target, body.raw, lambda: None, chunk,
                                                  usage if wants_usage else None),
                                     media_type="text/event-stream")
        result = await finish(http, job)
        account(target, result)
        text = target.answer(result.text, body.raw)
        return CompletionResponse(id=cid, created=created, model=body.model, usage=_usage(result),
                                  choices=[CompletionChoice(text=text, finish_reason=result.finish_reason)])

    @router.post("/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, http: Request) -> ChatCompletionResponse | StreamingResponse:
        target = await asyncio.to_thread(state.resolver.generative, body.model)  # registry reads: off the loop
        if target.templated(body.raw):  # trained on its template, not on chat turns: the last user turn fills it
            prompt = target.prompt_text(_last_user_text(body), body.raw)
            ids = await asyncio.to_thread(state.prompts.text_ids, prompt)
        else:
            ids = await asyncio.to_thread(state.prompts.chat_ids, body.messages)
        budget = state.prompts.budget(len(ids), target, body.token_limit, state.config.chat_max_tokens)
        job = queue(http, target, ids, _sampling(body, target, budget), body.stream)
        cid, created = new_id("chatcmpl"), now()
        if body.stream:
            def piece(delta: ChatDelta, finish: str | None) -> dict[str, Any]:
                choice = ChatChunkChoice(delta=delta, finish_reason=finish)  # type: ignore[arg-type]
                return ChatCompletionChunk(id=cid, created=created, model=body.model,
                                           choices=[choice]).model_dump(exclude_none=True)

            def usage(u: Usage) -> dict[str, Any]:
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [], "usage": u.model_dump()}

            wants_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                event_stream(job, target, body.raw, lambda: piece(ChatDelta(role="assistant", content=""), None),
                             lambda text, finish: piece(ChatDelta(content=text), finish),
                             usage if wants_usage else None),
                media_type="text/event-stream")
        result = await finish(http, job)
        account(target, result)
        return ChatCompletionResponse(
            id=cid, created=created, model=body.model, usage=_usage(result),
            choices=[ChatChoice(message=ChatResponseMessage(content=target.answer(result.text, body.raw)),
                                finish_reason=result.finish_reason)])

    @router.post("/classify")
    async def classify(body: ClassifyRequest, http: Request) -> ClassifyResponse:
        target = await asyncio.to_thread(state.resolver.classifier, body.model)
        http.state.model = target.adapter
        texts = [target.prompt_text(t, body.raw) for t in body.texts]
        limit = state.config.max_classify_inputs
        if len(texts) > limit:
            raise_too_many(len(texts), limit)
        lengths = await asyncio.to_thread(lambda: [len(state.prompts.text_ids(t)) for t in texts])
        for length in lengths:
            state.prompts.budget(length - 1, target, None, 1)
        requests = [EngineRequest(prompt=t, adapter=target.adapter) for t in texts]
        results = await state.scheduler.classify(requests)
        state.metrics.tokens(target.adapter or state.base.name, sum(lengths), 0)
        if target.adapter is not None:
            state.engine.usage.served(target.adapter, len(texts), sum(lengths), 0)
        data = [ClassifyResult(index=i, label=r.label, probabilities=r.probabilities) for i, r in enumerate(results)]
        return ClassifyResponse(id=new_id("cls"), created=now(), model=body.model, data=data,
                                usage={"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)})

    return router


def _last_user_text(body: ChatCompletionRequest) -> str:
    """The text of the chat's last user message (what an adapter's template is filled with)."""
    for message in reversed(body.messages):
        if message.role == "user":
            return message.text
    from adapterhub_local.errors import ConfigError

    raise ConfigError(["the chat has no user message to fill the adapter's template with"],
                      'add a user message, or send "raw": true to run the chat as it is', what="chat request")


async def _disconnected(http: Request) -> None:
    """Return when the client has gone (the body is read by now, so the next ASGI message is the disconnect)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def raise_too_many(count: int, limit: int) -> None:
    from adapterhub_local.errors import ConfigError

    raise ConfigError([f"input holds {count} texts, more than {limit}"], "split it into several calls",
                      what="classify request")
