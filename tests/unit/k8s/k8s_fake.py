"""A small local Kubernetes API server speaking the real list/watch protocol, scripted from tests.

Serves pods (``/api/v1/namespaces/{ns}/pods``) and InferencePools
(``/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools``):

* LIST: ``{"kind": ...List, "metadata": {"resourceVersion": ...}, "items": [...]}``; ``labelSelector`` (equality
  terms) and ``fieldSelector=metadata.name=...`` are honoured.
* WATCH (``?watch=1``): chunked newline-delimited JSON events ``ADDED``/``MODIFIED``/``DELETED``/``BOOKMARK``/``ERROR``.
  A watch from a resourceVersion replays the changes after it; a version older than the compaction point gets an
  ``ERROR`` event with a ``Status`` 410 Gone (what the real API server does). An object that stops / starts matching
  the label selector is sent as ``DELETED`` / ``ADDED``, like the real server.
* Scripted faults: :meth:`FakeApiServer.drop_watches` (connections cut), :meth:`FakeApiServer.expire` (ERROR 410 to
  live watches and compaction), :meth:`FakeApiServer.fail_next` (HTTP errors), :meth:`FakeApiServer.bookmark`.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

POD_PATH = "/api/v1/namespaces/{ns}/pods"
POOL_PATH = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"


def _parse_label_selector(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = term.partition("=")
        out[k] = v.lstrip("=")
    return out


def _parse_field_selector(text: str) -> dict[str, str]:
    return _parse_label_selector(text)


@dataclass
class _Watcher:
    resource: str
    namespace: str
    labels: dict[str, str]
    fields: dict[str, str]
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


class FakeApiServer:
    def __init__(self) -> None:
        self.rv = 100
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {"pods": {}, "inferencepools": {}}
        # (rv, resource, type, old, new) history for watches that resume from a version
        self.history: list[tuple[int, str, str, dict[str, Any] | None, dict[str, Any] | None]] = []
        self.compacted_rv = 0
        self.watchers: list[_Watcher] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (resource, "list"|"watch", query)
        self._fail: list[int] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._handle_pods)
        app.router.add_get("/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools", self._handle_pools)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    # -- scripting ------------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.setdefault("namespace", "default"), meta["name"])
        old = self.objects[resource].get(key)
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        self.objects[resource][key] = obj
        self._emit(rv, resource, "MODIFIED" if old else "ADDED", old, obj)
        return obj

    def delete(self, resource: str, name: str, namespace: str = "default") -> None:
        old = self.objects[resource].pop((namespace, name))
        rv = self._next_rv()
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(rv)
        self._emit(rv, resource, "DELETED", old, gone)

    def drop_watches(self) -> None:
        """Cut every open watch connection (the client sees EOF)."""
        for w in self.watchers:
            w.queue.put_nowait(None)
        self.watchers.clear()

    def expire(self) -> None:
        """Compact history: every live watch gets ERROR 410 Gone, and resuming from any old version does too."""
        self.compacted_rv = self.rv + 1
        for w in self.watchers:
            w.queue.put_nowait(_gone_event(self.rv))
            w.queue.put_nowait(None)
        self.watchers.clear()

    def bookmark(self) -> None:
        for w in self.watchers:
            w.queue.put_nowait({"type": "BOOKMARK", "object": {"kind": _kind(w.resource), "metadata": {"resourceVersion": str(self.rv)}}})

    def fail_next(self, *statuses: int) -> None:
        """Answer the next requests (list or watch) with these HTTP statuses."""
        self._fail.extend(statuses)

    def count(self, resource: str, verb: str) -> int:
        return sum(1 for r, v, _ in self.requests if r == resource and v == verb)

    async def wait_watchers(self, resource: str, n: int = 1, timeout: float = 5.0) -> None:
        async def _wait() -> None:
            while sum(1 for w in self.watchers if w.resource == resource) < n:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(_wait(), timeout)

    # -- protocol -------------------------------------------------------------------------------

    def _emit(self, rv: int, resource: str, etype: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        self.history.append((rv, resource, etype, old, new))
        for w in list(self.watchers):
            ev = _event_for(w, etype, old, new)
            if ev is not None:
                w.queue.put_nowait(ev)

    async def _handle_pods(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "pods")

    async def _handle_pools(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "inferencepools")

    async def _handle(self, request: web.Request, resource: str) -> web.StreamResponse:
        q = dict(request.query)
        watch = q.get("watch") in ("1", "true", "True")
        self.requests.append((resource, "watch" if watch else "list", q))
        if self._fail:
            status = self._fail.pop(0)
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status, "reason": "Injected", "message": "injected"}
            return web.json_response(body, status=status)
        ns = request.match_info["ns"]
        labels = _parse_label_selector(q.get("labelSelector", ""))
        fields = _parse_field_selector(q.get("fieldSelector", ""))
        if not watch:
            items = [copy.deepcopy(o) for (ons, _), o in sorted(self.objects[resource].items()) if ons == ns and _matches(o, labels, fields)]
            return web.json_response(
                {"kind": _kind(resource) + "List", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            )
        w = _Watcher(resource, ns, labels, fields)
        since = int(q.get("resourceVersion") or 0)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if since and since < self.compacted_rv:
            await resp.write((json.dumps(_gone_event(since)) + "\n").encode())
            await resp.write_eof()
            return resp
        for rv, res, etype, old, new in self.history:
            if res == resource and rv > since:
                ev = _event_for(w, etype, old, new)
                if ev is not None:
                    w.queue.put_nowait(ev)
        self.watchers.append(w)
        try:
            while True:
                ev = await w.queue.get()
                if ev is None:
                    break
                await resp.write((json.dumps(ev) + "\n").encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if w in self.watchers:
                self.watchers.remove(w)
        with _suppress():
            await resp.write_eof()
        return resp


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _kind(resource: str) -> str:
    return "Pod" if resource == "pods" else "InferencePool"


def _gone_event(rv: int) -> dict[str, Any]:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {rv}",
            "reason": "Expired",
            "code": 410,
        },
    }


def _matches(obj: dict[str, Any] | None, labels: dict[str, str], fields: dict[str, str]) -> bool:
    if obj is None:
        return False
    meta = obj.get("metadata") or {}
    have = meta.get("labels") or {}
    if any(have.get(k) != v for k, v in labels.items()):
        return False
    for k, v in fields.items():
        if k == "metadata.name" and meta.get("name") != v:
            return False
    return True


def _event_for(w: _Watcher, etype: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    obj = new if new is not None else old
    if obj is None or (obj.get("metadata") or {}).get("namespace", "default") != w.namespace:
        return None
    was, now = _matches(old, w.labels, w.fields), _matches(new, w.labels, w.fields)
    if etype == "DELETED":
        return {"type": "DELETED", "object": new} if was else None
    if was and now:
        return {"type": "MODIFIED", "object": new}
    if now:
        return {"type": "ADDED", "object": new}
    if was:  # stopped matching the selector: the real API server sends DELETED
        return {"type": "DELETED", "object": new}
    return None


# -- object builders ---------------------------------------------------------------------------


def make_pod(
    name: str,
    ip: str | None,
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    terminating: bool = False,
    namespace: str = "default",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels if labels is not None else {"app": "vllm"})}
    if terminating:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "vllm"}]}, "status": status}


def make_pool(
    name: str = "pool",
    *,
    selector: dict[str, str] | None = None,
    ports: tuple[int, ...] = (8000,),
    failure_mode: str | None = "FailClose",
    namespace: str = "default",
) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": f"{name}-epp", "kind": "Service", "port": {"number": 9002}}
    if failure_mode is not None:
        ref["failureMode"] = failure_mode
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": dict(selector or {"app": "vllm"})},
            "targetPorts": [{"number": p} for p in ports],
            "endpointPickerRef": ref,
        },
    }


async def eventually(predicate: Any, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` is true (state propagation through the watch is asynchronous)."""

    async def _wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(_wait(), timeout)
