"""The HTTP surface: a Starlette app speaking OpenAI's API on a `Runner`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as
server-sent events or not), `GET /v1/models[/{id}]`, `GET /health`, and
kvscope's own `GET /kvscope/requests[/{id}]` and
`POST /kvscope/requests/{id}/pin`. With an API key every route but
`/health` wants `Authorization: Bearer KEY` (401 in OpenAI's shape
otherwise). Every error is OpenAI's error JSON with its status.

A client that disconnects cancels its job: a stream's generator is closed
by Starlette, a waiting non-streamed request notices `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvscope.server.errors import APIError, from_engine
from kvscope.server.protocol import ParsedRequest, parse_chat, parse_completion, parse_json
from kvscope.server.runner import DONE, STARTED, Job, Runner
from kvscope.server.shapes import ChunkMaker, StopFilter, completion, new_id
from kvscope.server.workflow import agent_and_step


@dataclass(frozen=True)
class ServedModel:
    id: str  # the name clients send as `model`
    aliases: tuple[str, ...]  # other accepted names (the --model argument, its path)
    created: int


def create_app(runner: Runner, model: ServedModel, api_key: str | None = None) -> Starlette:
    def guarded(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if api_key is not None:
                    _check_key(request, api_key)
                return await fn(request)
            except APIError as exc:
                return exc.response()

        return endpoint

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model.id, "queued": runner.worker.pending()})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(model)]})

    async def one_model(request: Request) -> Response:
        _check_model(model, request.path_params["model_id"])
        return JSONResponse(_model_card(model))

    async def chat(request: Request) -> Response:
        return await _generate(request, runner, model, parse_chat)

    async def completions(request: Request) -> Response:
        return await _generate(request, runner, model, parse_completion)

    async def requests_list(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [r.to_dict() for r in runner.log.all()]})

    async def request_one(request: Request) -> Response:
        return JSONResponse(_record(runner, request).to_dict())

    async def request_pin(request: Request) -> Response:
        rec = _record(runner, request)
        raw = await read_body(request, 1 << 16)
        body = parse_json(raw) if raw.strip() else {}
        pinned = body.get("pinned", True)
        if not isinstance(pinned, bool):
            raise APIError(400, "'pinned' must be a boolean.", param="pinned")
        return JSONResponse(runner.log.pin(rec.id, pinned).to_dict())

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", guarded(one_model), methods=["GET"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/kvscope/requests", guarded(requests_list), methods=["GET"]),
        Route("/kvscope/requests/{rid:int}", guarded(request_one), methods=["GET"]),
        Route("/kvscope/requests/{rid:int}/pin", guarded(request_pin), methods=["POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        msg = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, msg).response()

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _check_key(request: Request, api_key: str) -> None:
    auth = request.headers.get("authorization", "")
    if not auth:
        raise APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        shown = (given[:3] + "*" * 4 + given[-4:]) if len(given) > 8 else "*" * 4
        raise APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")


def _model_card(model: ServedModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": "kvscope"}


def _check_model(model: ServedModel, name: str) -> None:
    if name != model.id and name not in model.aliases:
        raise APIError(
            404,
            f"The model `{name}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


def _record(runner: Runner, request: Request) -> Any:
    rid = request.path_params["rid"]
    try:
        return runner.log.get(rid)
    except KeyError:
        raise APIError(404, f"No request {rid} (the log keeps the latest requests only).", code="not_found") from None


MAX_BODY_BYTES = 32 << 20


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with a 413 past `limit` bytes (before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body too large: {int(declared)} bytes (the limit is {limit >> 20} MB).")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body too large (the limit is {limit >> 20} MB).")
        chunks.append(chunk)
    return b"".join(chunks)


async def _generate(
    request: Request, runner: Runner, model: ServedModel, parse: Callable[[dict[str, Any]], ParsedRequest]
) -> Response:
    body = parse_json(await read_body(request))
    req = parse(body)
    _check_model(model, req.model)
    agent, step = agent_and_step(request.headers, body, request.client.host if request.client else "")
    job = runner.start(req, agent, body, step)
    cid = new_id(req.endpoint)
    if req.stream:
        # Headers go out once the request runs, so a bad prompt still gets its 4xx status.
        await _wait_or_disconnect(request, job, started=True)
        return StreamingResponse(
            _stream(job, ChunkMaker(cid, model.id, req.endpoint, req.include_usage), req),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    outcome = await _wait_or_disconnect(request, job)
    return JSONResponse(completion(cid, model.id, outcome.record, outcome.result.text, outcome.result.finish_reason))


async def _wait_or_disconnect(request: Request, job: Job, started: bool = False) -> Any:
    """The job's outcome (or, with `started`, True once it runs); its error as an `APIError`."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        if started:
            if await job.pieces.get() is STARTED:
                return True
        return await job.outcome()
    except APIError:
        raise
    except Exception as exc:
        raise from_engine(exc) from exc
    finally:
        watcher.cancel()


async def _stream(job: Job, chunks: ChunkMaker, req: ParsedRequest) -> AsyncIterator[bytes]:
    stop = StopFilter(req.sampling.stop)
    try:
        first = chunks.first()
        if first:
            yield first
        done = False
        while not done:
            parts = [await job.pieces.get()]
            while not job.pieces.empty():  # what else is waiting goes out in the same chunk
                parts.append(job.pieces.get_nowait())
            done = parts[-1] is DONE
            text = stop.feed("".join(p for p in parts if p is not DONE))
            if text:
                yield chunks.piece(text)
        try:
            outcome = await job.outcome()
        except Exception as exc:  # noqa: BLE001 - the stream has started: report the error in it
            yield chunks.error(from_engine(exc).body())
            yield chunks.done()
            return
        rest = stop.finish(outcome.result.text)
        if rest:
            yield chunks.piece(rest)
        yield chunks.last(outcome.result.finish_reason, outcome.record)
        yield chunks.done()
    finally:
        if job.future is not None and not job.future.done():
            job.cancel()  # the client went away mid-stream
