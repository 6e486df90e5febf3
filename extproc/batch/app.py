"""HTTP API of the batch service (aiohttp): ``/v1/files`` and ``/v1/batches`` with OpenAI's shapes and errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from extproc.batch import model as m
from extproc.batch.service import BatchService

log = logging.getLogger(__name__)

SERVICE_KEY: web.AppKey[BatchService] = web.AppKey("batch_service", BatchService)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj), content_type="application/json")


def _err(e: m.ApiError) -> web.Response:
    return _json(e.body(), e.status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except m.ApiError as e:
        return _err(e)
    except web.HTTPRequestEntityTooLarge as e:
        return _err(m.ApiError(413, f"the request body is too large ({e.text})", code="file_too_large"))
    except web.HTTPNotFound:
        return _err(m.ApiError(404, f"Unknown request URL: {request.method} {request.path}", code="unknown_url"))
    except web.HTTPMethodNotAllowed:
        return _err(m.ApiError(405, f"Method {request.method} is not allowed on {request.path}", code="method_not_allowed"))
    except web.HTTPException:
        raise
    except Exception:
        log.exception("batch API %s %s failed", request.method, request.path)
        return _err(m.ApiError(500, "internal error in the batch service", type="server_error", code="internal_error"))


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "20")
    try:
        n = int(raw)
    except ValueError:
        raise m.ApiError(400, f"limit must be an integer between 1 and 100, not {raw!r}", param="limit", code="invalid_limit") from None
    if not 1 <= n <= 100:
        raise m.ApiError(400, f"limit must be between 1 and 100, not {n}", param="limit", code="invalid_limit")
    return n


def _page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None, "has_more": more}


async def create_file(request: web.Request) -> web.Response:
    svc = request.app[SERVICE_KEY]
    if not request.content_type.startswith("multipart/"):
        raise m.ApiError(400, "upload the file as multipart/form-data with fields 'file' and 'purpose'", code="invalid_content_type")
    reader = await request.multipart()
    purpose, filename, data = None, "", None
    async for part in reader:
        name = getattr(part, "name", None)
        if name == "purpose":
            purpose = (await part.read()).decode("utf-8", "replace").strip()  # type: ignore[union-attr]
        elif name == "file":
            filename = getattr(part, "filename", None) or "upload.jsonl"
            buf = bytearray()
            while chunk := await part.read_chunk(1 << 20):  # type: ignore[union-attr]
                buf += chunk
                if len(buf) > svc.cfg.max_file_bytes:
                    raise m.ApiError(413, f"the file is larger than {svc.cfg.max_file_bytes} bytes", param="file", code="file_too_large")
            data = bytes(buf)
    if data is None:
        raise m.ApiError(400, "missing the 'file' field", param="file", code="missing_required_parameter")
    if purpose is None:
        raise m.ApiError(400, "missing the 'purpose' field", param="purpose", code="missing_required_parameter")
    rec = await svc.create_file(filename, purpose, data)
    return _json(rec.to_api())


async def list_files(request: web.Request) -> web.Response:
    svc = request.app[SERVICE_KEY]
    items, more = await svc.store.list_files(request.query.get("purpose") or None, _limit(request) if "limit" in request.query else 100, request.query.get("after") or None)
    return _json(_page([f.to_api() for f in items], more))


async def get_file(request: web.Request) -> web.Response:
    rec = await request.app[SERVICE_KEY].get_file(request.match_info["file_id"])
    return _json(rec.to_api())


async def file_content(request: web.Request) -> web.Response:
    data = await request.app[SERVICE_KEY].file_content(request.match_info["file_id"])
    return web.Response(body=data, content_type="application/jsonl")


async def delete_file(request: web.Request) -> web.Response:
    return _json(await request.app[SERVICE_KEY].delete_file(request.match_info["file_id"]))


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else {}
    except ValueError as e:
        raise m.ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


async def create_batch(request: web.Request) -> web.Response:
    svc = request.app[SERVICE_KEY]
    b = await svc.create_batch(await _body(request), fairness_id=request.headers.get("x-gateway-inference-fairness-id", ""))
    return _json(b.to_api())


async def list_batches(request: web.Request) -> web.Response:
    items, more = await request.app[SERVICE_KEY].list_batches(_limit(request), request.query.get("after") or None)
    return _json(_page([b.to_api() for b in items], more))


async def get_batch(request: web.Request) -> web.Response:
    return _json((await request.app[SERVICE_KEY].get_batch(request.match_info["batch_id"])).to_api())


async def cancel_batch(request: web.Request) -> web.Response:
    return _json((await request.app[SERVICE_KEY].cancel_batch(request.match_info["batch_id"])).to_api())


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    svc = request.app[SERVICE_KEY]
    await svc.metrics.refresh(svc.store)  # job counts and queue age fresh at scrape time
    return web.Response(body=svc.metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "owner": request.app[SERVICE_KEY].owner})


def build_app(svc: BatchService, *, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=max_body_bytes)
    app[SERVICE_KEY] = svc
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app
