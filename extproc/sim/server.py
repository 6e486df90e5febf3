"""One simulated vLLM pod: an aiohttp app on its own port driving an :class:`~extproc.sim.engine.Engine` in
real time, many pods per process.

The engine loop task steps the engine while it has work, sleeps the step's duration and then hands each
request's new token to its handler (one list append and one future per request per step). Streaming
responses are assembled from pre-rendered JSON fragments: only the token text is JSON-escaped, and that is
cached per token id.

Endpoints (shapes follow vLLM's OpenAI server, vllm/entrypoints/openai): ``/v1/completions`` (``prompt`` a
string, token ids, or a batch: a list of strings / token-id lists, one choice per element), ``/v1/embeddings``
(``input`` in the same forms; the engine prefills each input), ``/v1/chat/completions`` (SSE ``data: {json}\\n\\n`` chunks, ``stream_options.include_usage`` → a final
chunk with empty ``choices`` and ``usage``, then ``data: [DONE]``), ``/v1/models``, ``/health``,
``/metrics``, ``/tokenize``, ``/detokenize``, and what peer routers probe: ``/get_model_info``,
``/get_server_info``, ``/get_load``, ``/v1/completions/render``, ``/v1/chat/completions/render``.
Every response carries ``x-inference-pod: host:port``. Errors use vLLM's ``{"error": {message, type,
param, code}}`` shape.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import random
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from extproc.sim.engine import Engine, StepResult, SimRequest
from extproc.sim.kvevents import KVEventPublisher
from extproc.sim.metrics import CONTENT_TYPE, PodMetrics
from extproc.sim.profiles import Profile
from extproc.datalayer.simtokenizer import get_tokenizer

__all__ = ["Faults", "SimPod", "POD_HEADER"]

log = logging.getLogger(__name__)

POD_HEADER = "x-inference-pod"
_DIE_AFTER_CHUNKS = 3
_KV_LOAD_FAILED = "KV cache load from the prefill instance failed (kv_load_failure_policy=fail)"
_JSON = "application/json"

_tok_json: dict[int, bytes] = {}


def _embedding(ids: list[int], dims: int) -> list[float]:
    """A deterministic unit vector for a token sequence (same ids → same vector, on every pod)."""
    seed = hashlib.blake2b(struct.pack(f"<{len(ids)}q", *ids), digest_size=8).digest()
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _token_json(tok: int) -> bytes:
    b = _tok_json.get(tok)
    if b is None:
        b = json.dumps(get_tokenizer().token_text(tok)).encode("utf-8")
        _tok_json[tok] = b
    return b


@dataclass(slots=True)
class Faults:
    error_rate: float = 0.0
    slow_factor: float = 1.0
    hang: bool = False
    die_mid_stream: bool = False
    metrics_fail: bool = False
    metrics_delay_s: float = 0.0


class _Stream:
    __slots__ = ("tokens", "finished", "waiter", "num_cached", "error", "block_ids")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finished = False
        self.waiter: asyncio.Future[None] | None = None
        self.num_cached = 0
        self.error = False  # finished with finish_reason "error" (a failed remote KV load, policy "fail")
        self.block_ids: list[int] | None = None  # prefill leg: the prompt's KV blocks


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param


def _error_response(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type=_JSON)


def _bad_request(message: str, param: str | None = None) -> _HTTPError:
    return _HTTPError(400, message, "BadRequestError", param)


class SimPod:
    """A simulated vLLM server. ``await start()``, ``await stop()``; ``kill()``/``restart()`` for failure tests."""

    def __init__(
        self,
        profile: Profile,
        *,
        model: str = "sim-llama",
        loras: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        time_scale: float = 1.0,
        kv_events: bool = False,
        kv_events_array_encoding: bool = False,
        kv_events_connect: str | None = None,
        role: str = "both",
        kv_connector: bool = False,
        link: str = "rdma-400g",
        kv_failure_rate: float = 0.0,
        kv_load_failure_policy: str = "fail",
    ) -> None:
        from extproc.sim.kvtransfer import FAILURE_POLICIES, get_link

        if not 0.0 <= kv_failure_rate <= 1.0:
            raise ValueError("kv_failure_rate must be within [0, 1]")
        if kv_load_failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"kv_load_failure_policy must be one of {FAILURE_POLICIES}")
        self.role = role  # llm-d.ai/role label value: prefill | decode | both
        self.kv_connector = kv_connector  # NixlConnector configured (kv_role kv_both): honours kv_transfer_params
        self.link = get_link(link)
        self.kv_failure_rate = kv_failure_rate
        self.kv_load_failure_policy = kv_load_failure_policy
        self.engine_id = uuid.uuid4().hex
        self._kv_rng = random.Random(f"kv:{seed}")
        self.profile = profile
        self.model = model
        self.loras = tuple(loras)
        self.host = host
        self.port = port
        self.seed = seed
        self.time_scale = time_scale
        self.kv_events_enabled = kv_events
        self.kv_events_array_encoding = kv_events_array_encoding
        self.kv_events_connect = kv_events_connect  # publish to this (bound) endpoint instead of binding our own
        self.faults = Faults()
        self.engine = self._new_engine()
        self.metrics = PodMetrics(
            self.engine, model, lora_enabled=bool(self.loras), max_loras=profile.max_loras, kv_connector=kv_connector
        )
        self.publisher: KVEventPublisher | None = None
        self._rng = random.Random(seed)
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._unhang = asyncio.Event()
        self._unhang.set()
        self._loop_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._created = int(time.time())
        self._tokenizer = get_tokenizer()
        self._alive = False

    # ---- identity ---------------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def topic(self) -> str:
        return f"kv@{self.address}@{self.model}"

    @property
    def kv_events_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    @property
    def replay_endpoint(self) -> str | None:
        return self.publisher.replay_endpoint if self.publisher else None

    @property
    def alive(self) -> bool:
        return self._alive

    def _new_engine(self) -> Engine:
        return Engine(self.profile, seed=self.seed, time_scale=self.time_scale, record_kv_events=self.kv_events_enabled)

    # ---- faults -----------------------------------------------------------------------------------------------
    def set_faults(
        self,
        error_rate: float = 0.0,
        slow_factor: float = 1.0,
        hang: bool = False,
        die_mid_stream: bool = False,
        metrics_fail: bool = False,
        metrics_delay_s: float = 0.0,
    ) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")
        if slow_factor <= 0:
            raise ValueError("slow_factor must be > 0")
        self.faults = Faults(error_rate, slow_factor, hang, die_mid_stream, metrics_fail, metrics_delay_s)
        self.engine.slowdown = slow_factor
        if hang:
            self._unhang.clear()
        else:
            self._unhang.set()

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._add_pod_header)
        r = app.router
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/embeddings", self._embeddings)
        r.add_get("/v1/models", self._models)
        r.add_get("/health", self._health)
        r.add_get("/metrics", self._metrics)
        r.add_post("/tokenize", self._tokenize)
        r.add_post("/detokenize", self._detokenize)
        r.add_get("/get_model_info", self._model_info)
        r.add_get("/get_server_info", self._server_info)
        r.add_get("/get_load", self._get_load)
        r.add_post("/v1/completions/render", self._render_completions)
        r.add_post("/v1/chat/completions/render", self._render_chat)
        return app

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    async def start(self) -> None:
        if self._alive:
            return
        sock = self._bind()
        if self.kv_events_enabled and self.publisher is None:
            self.publisher = KVEventPublisher(
                self.topic, host=self.host, array_encoding=self.kv_events_array_encoding, connect=self.kv_events_connect
            )
        self._runner = web.AppRunner(
            self._build_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await self._runner.setup()
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()
        self._loop_task = asyncio.get_running_loop().create_task(self._engine_loop(), name=f"sim-{self.address}")
        self._alive = True
        log.debug("sim pod %s up (%s)", self.address, self.profile.name)

    async def kill(self) -> None:
        """Die: stop listening, drop every connection, lose all engine state (the port stays reserved for restart)."""
        if not self._alive:
            return
        self._alive = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        runner = self._runner
        if runner is not None:
            if runner.server is not None:
                for conn in runner.server.connections:
                    conn.force_close()
            await runner.cleanup()
        self._runner = None
        self._site = None
        for st in self._streams.values():
            if st.waiter is not None and not st.waiter.done():
                st.waiter.cancel()
        self._streams.clear()
        self._unhang.set()

    async def restart(self) -> None:
        """Come back on the same port with a fresh engine (empty KV cache, zeroed counters)."""
        await self.kill()
        self.engine = self._new_engine()
        self.engine.slowdown = self.faults.slow_factor
        self.metrics = PodMetrics(
            self.engine, self.model, lora_enabled=bool(self.loras), max_loras=self.profile.max_loras,
            kv_connector=self.kv_connector,
        )
        if self.publisher is not None:
            self.engine.kv.reset()  # records AllBlocksCleared for subscribers
            self.publisher.publish(self.engine.kv.take_events())
        if self.faults.hang:
            self._unhang.clear()
        await self.start()

    async def stop(self) -> None:
        await self.kill()
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None

    # ---- engine loop ------------------------------------------------------------------------------------------
    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        try:
            while True:
                eng = self.engine
                if not eng.has_work():
                    wake.clear()
                    await wake.wait()
                    continue
                now = loop.time()
                res = eng.step(now)
                delay = now + res.duration_s - loop.time()
                if res.idle:
                    # waiting for a remote KV transfer to land: a new arrival may run meanwhile
                    self._deliver(res)
                    wake.clear()
                    with contextlib.suppress(TimeoutError):  # not wait_for: it can swallow a cancel on 3.11
                        async with asyncio.timeout(delay if delay > 0 else 0):
                            await wake.wait()
                    continue
                await asyncio.sleep(delay if delay > 0 else 0)
                self._deliver(res)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("engine loop of %s crashed", self.address)
            raise

    def _deliver(self, res: StepResult) -> None:
        streams = self._streams
        for o in res.outputs:
            st = streams.get(o.request_id)
            if st is None:
                continue
            st.tokens.extend(o.token_ids)
            st.num_cached = o.num_cached_tokens
            if o.block_ids is not None:
                st.block_ids = o.block_ids
            if o.finished:
                st.finished = True
                st.error = o.finish_reason == "error"
                del streams[o.request_id]
            w = st.waiter
            if w is not None and not w.done():
                w.set_result(None)
        if res.kv_events and self.publisher is not None:
            self.publisher.publish(res.kv_events)
        self.metrics.observe(res)

    # ---- middleware -------------------------------------------------------------------------------------------
    async def _add_pod_header(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[POD_HEADER] = self.address

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not self._unhang.is_set():
            await self._unhang.wait()
        try:
            return await handler(request)
        except _HTTPError as e:
            return _error_response(e.status, e.message, e.err_type, e.param)
        except web.HTTPException as e:
            if e.status >= 400:
                return _error_response(e.status, e.reason, "NotFoundError" if e.status == 404 else "BadRequestError")
            raise

    # ---- request parsing --------------------------------------------------------------------------------------
    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad_request(f"JSON decode error: {e}") from None
        if not isinstance(body, dict):
            raise _bad_request("Input should be a valid dictionary or object to extract fields from")
        return body

    def _resolve_model(self, body: dict[str, Any]) -> str | None:
        """The LoRA adapter the request names (None for the base model); 404 for an unknown model."""
        name = body.get("model")
        if name is None or name == self.model:
            return None
        if not isinstance(name, str):
            raise _bad_request("model: Input should be a valid string", "model")
        if name in self.loras:
            return name
        raise _HTTPError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")

    def _prompt_ids(self, body: dict[str, Any]) -> list[int]:
        """The single prompt of ``body`` (``/render`` and one-prompt requests); a batch is a 400 here."""
        batch = self._prompt_batch(body)
        if len(batch) != 1:
            raise _bad_request("this endpoint takes a single prompt", "prompt")
        return batch[0]

    def _prompt_batch(self, body: dict[str, Any], key: str = "prompt") -> list[list[int]]:
        """Completions ``prompt`` / embeddings ``input`` as vLLM accepts it: a string, a list of token ids, a
        list of strings, or a list of token-id lists (a batch: one choice / embedding per element)."""
        if key not in body:
            raise _bad_request(f"Field required: {key}", key)
        prompt = body[key]
        if isinstance(prompt, str):
            return [self._tokenizer.encode(prompt, add_special_tokens=True)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [list(prompt)]
            if all(isinstance(p, str) for p in prompt):
                return [self._tokenizer.encode(p, add_special_tokens=True) for p in prompt]
            if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
                return [list(p) for p in prompt]
        raise _bad_request(f"{key} must be a string, a list of strings, a list of token ids, or a list of token-id lists", key)

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        msgs = body.get("messages")
        if msgs is None:
            raise _bad_request("Field required: messages", "messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise _bad_request("messages must be a list of message objects", "messages")
        return self._tokenizer.encode_chat(msgs, add_generation_prompt=bool(body.get("add_generation_prompt", True)))

    @staticmethod
    def _max_tokens(body: dict[str, Any], chat: bool) -> int | None:
        v = body.get("max_completion_tokens") if chat else None
        if v is None:
            v = body.get("max_tokens")
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad_request("max_tokens must be an integer", "max_tokens")
        return v

    # ---- inference --------------------------------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await self._json_body(request)
        lora = self._resolve_model(body)
        batch = [self._chat_ids(body)] if chat else self._prompt_batch(body)
        max_tokens = self._max_tokens(body, chat)
        if len(batch) > 1:
            return await self._generate_batch(request, body, batch, lora, max_tokens)
        ids = batch[0]
        f = self.faults
        if f.error_rate > 0 and self._rng.random() < f.error_rate:
            return _error_response(500, "simulated internal server error (fault injection)", "InternalServerError")
        loop = asyncio.get_running_loop()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        sreq = SimRequest(rid, ids, max_tokens, lora, loop.time())
        kvp = self._kv_transfer_params(body) if self.kv_connector else None
        if kvp is not None:
            self._apply_kv_params(sreq, kvp)
        try:
            self.engine.add_request(sreq)
        except ValueError as e:
            raise _bad_request(str(e)) from None
        stream = _Stream()
        self._streams[rid] = stream
        self._wake.set()
        model_name = body.get("model") or self.model
        done = False
        try:
            if body.get("stream"):
                opts = body.get("stream_options") or {}
                include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
                resp = await self._stream(request, rid, stream, str(model_name), chat, include_usage, len(ids))
            else:
                resp = await self._complete(rid, stream, str(model_name), chat, len(ids), sreq.remote_decode)
            done = True
            return resp
        finally:
            if not done:
                self._streams.pop(rid, None)
                self.engine.abort(rid)

    def _submit(self, rid: str, ids: list[int], max_tokens: int | None, lora: str | None) -> _Stream:
        try:
            self.engine.add_request(SimRequest(rid, ids, max_tokens, lora, asyncio.get_running_loop().time()))
        except ValueError as e:
            raise _bad_request(str(e)) from None
        stream = _Stream()
        self._streams[rid] = stream
        self._wake.set()
        return stream

    def _abort_all(self, rids: list[str]) -> None:
        for rid in rids:
            if self._streams.pop(rid, None) is not None:
                self.engine.abort(rid)

    async def _finished_tokens(self, stream: _Stream) -> list[int]:
        await self._wait_tokens(stream, 0)
        while not stream.finished:
            await self._wait_tokens(stream, len(stream.tokens))
        return stream.tokens

    async def _generate_batch(
        self, request: web.Request, body: dict[str, Any], batch: list[list[int]], lora: str | None, max_tokens: int | None
    ) -> web.StreamResponse:
        """A completions request whose ``prompt`` is a list: one engine request per prompt, choice ``index`` = the
        prompt's position, usage summed (what vLLM's OpenAI server returns for a prompt batch)."""
        f = self.faults
        if f.error_rate > 0 and self._rng.random() < f.error_rate:
            return _error_response(500, "simulated internal server error (fault injection)", "InternalServerError")
        rid = "cmpl-" + uuid.uuid4().hex
        rids = [f"{rid}-{i}" for i in range(len(batch))]
        streams: list[_Stream] = []
        try:
            for r, ids in zip(rids, batch):
                streams.append(self._submit(r, ids, max_tokens, lora))
            model = str(body.get("model") or self.model)
            n_prompt = sum(len(ids) for ids in batch)
            if body.get("stream"):
                return await self._stream_batch(request, rid, rids, streams, model, body, n_prompt)
            outs = await asyncio.gather(*(self._finished_tokens(st) for st in streams))
        finally:
            self._abort_all(rids)
        n_out = sum(len(t) for t in outs)
        choices = [
            {"index": i, "text": self._tokenizer.decode(t), "logprobs": None, "finish_reason": "length",
             "stop_reason": None, "prompt_logprobs": None}
            for i, t in enumerate(outs)
        ]  # fmt: skip
        out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
               "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out, "completion_tokens": n_out,
                         "prompt_tokens_details": None}}  # fmt: skip
        return web.Response(body=json.dumps(out).encode(), content_type=_JSON)

    async def _stream_batch(
        self, request: web.Request, rid: str, rids: list[str], streams: list[_Stream], model: str,
        body: dict[str, Any], n_prompt: int,
    ) -> web.StreamResponse:  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        head = f'{{"id":"{rid}","object":"text_completion","created":{int(time.time())},"model":{json.dumps(model)},'
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def pump(i: int, stream: _Stream) -> None:
            sent = 0
            while True:
                await self._wait_tokens(stream, sent)
                toks, n = stream.tokens, len(stream.tokens)
                for j in range(sent, n):
                    fin = '"length"' if stream.finished and j == n - 1 else "null"
                    queue.put_nowait(
                        f'data: {head}"choices":[{{"index":{i},"text":'.encode() + _token_json(toks[j])
                        + f',"logprobs":null,"finish_reason":{fin},"stop_reason":null}}]}}\n\n'.encode()
                    )  # fmt: skip
                sent = n
                if stream.finished:
                    return

        async def pumps() -> None:
            try:
                await asyncio.gather(*(pump(i, st) for i, st in enumerate(streams)))
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(pumps())
        try:
            while (chunk := await queue.get()) is not None:
                await resp.write(chunk)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        n_out = sum(len(st.tokens) for st in streams)
        opts = body.get("stream_options") or {}
        if isinstance(opts, dict) and opts.get("include_usage"):
            await resp.write(
                (f'data: {head}"choices":[],"usage":{{"prompt_tokens":{n_prompt},'
                 f'"total_tokens":{n_prompt + n_out},"completion_tokens":{n_out}}}}}\n\n').encode()
            )  # fmt: skip
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        """``/v1/embeddings``: each input is prefilled by the engine (one step, its output discarded) so it
        loads the pod like vLLM's pooling runner; the vector is a deterministic unit vector of the token ids
        (``dimensions`` long, default 64), ``encoding_format`` float or base64."""
        body = await self._json_body(request)
        lora = self._resolve_model(body)
        batch = self._prompt_batch(body, "input")
        dims = body.get("dimensions", 64)
        if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 4096:
            raise _bad_request("dimensions must be an integer in [1, 4096]", "dimensions")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _bad_request("encoding_format must be 'float' or 'base64'", "encoding_format")
        f = self.faults
        if f.error_rate > 0 and self._rng.random() < f.error_rate:
            return _error_response(500, "simulated internal server error (fault injection)", "InternalServerError")
        rid = "embd-" + uuid.uuid4().hex
        rids = [f"{rid}-{i}" for i in range(len(batch))]
        try:
            streams = [self._submit(r, ids, 1, lora) for r, ids in zip(rids, batch)]
            await asyncio.gather(*(self._finished_tokens(st) for st in streams))
        finally:
            self._abort_all(rids)
        data = []
        for i, ids in enumerate(batch):
            vec = _embedding(ids, dims)
            emb: Any = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if fmt == "base64" else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n_prompt = sum(len(ids) for ids in batch)
        out = {"id": rid, "object": "list", "created": int(time.time()), "model": str(body.get("model") or self.model),
               "data": data, "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt, "completion_tokens": 0,
                                       "prompt_tokens_details": None}}  # fmt: skip
        return web.Response(body=json.dumps(out).encode(), content_type=_JSON)

    async def _wait_tokens(self, stream: _Stream, sent: int) -> None:
        while len(stream.tokens) == sent and not stream.finished:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            stream.waiter = fut
            try:
                await fut
            finally:
                stream.waiter = None

    async def _complete(
        self, rid: str, stream: _Stream, model: str, chat: bool, n_prompt: int, remote_decode: bool = False
    ) -> web.Response:
        await self._wait_tokens(stream, 0)
        while not stream.finished:
            await self._wait_tokens(stream, len(stream.tokens))
        if stream.error:
            return _error_response(500, _KV_LOAD_FAILED, "InternalServerError")
        text = self._tokenizer.decode(stream.tokens)
        n_out = len(stream.tokens)
        usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out, "completion_tokens": n_out,
                 "prompt_tokens_details": None}
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                            "audio": None, "function_call": None, "tool_calls": [], "reasoning_content": None},
                "logprobs": None, "finish_reason": "length", "stop_reason": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                      "prompt_logprobs": None}
            obj = "text_completion"
        out: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
                               "choices": [choice], "usage": usage}
        if remote_decode:
            # what vLLM's NixlConnector.request_finished returns for a do_remote_decode request
            out["kv_transfer_params"] = {
                "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": stream.block_ids or [],
                "remote_engine_id": self.engine_id, "remote_request_id": rid, "remote_host": self.host,
                "remote_port": self.port, "tp_size": self.profile.tensor_parallel,
            }
        return web.Response(body=json.dumps(out).encode(), content_type=_JSON)

    async def _stream(
        self,
        request: web.Request,
        rid: str,
        stream: _Stream,
        model: str,
        chat: bool,
        include_usage: bool,
        n_prompt: int,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())
        model_j = json.dumps(model)
        head = f'{{"id":"{rid}","object":"{"chat.completion.chunk" if chat else "text_completion"}","created":{created},"model":{model_j},'
        if chat:
            pre = (f'data: {head}"choices":[{{"index":0,"delta":{{"content":').encode()
            mid_open = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            mid_last = b'},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
            role = (f'data: {head}"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},'
                    '"logprobs":null,"finish_reason":null}]}\n\n').encode()
        else:
            pre = (f'data: {head}"choices":[{{"index":0,"text":').encode()
            mid_open = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            mid_last = b',"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
            role = b""
        die = self.faults.die_mid_stream
        if die:
            self.faults.die_mid_stream = False  # one-shot: the next streamed response dies
        sent = 0
        chunks_out = 0
        while True:
            await self._wait_tokens(stream, sent)
            toks = stream.tokens
            n = len(toks)
            parts: list[bytes] = []
            if sent == 0 and role:
                parts.append(role)
            last = n - 1 if stream.finished else -1
            for i in range(sent, n):
                parts.append(pre)
                parts.append(_token_json(toks[i]))
                parts.append(mid_last if i == last else mid_open)
            chunks_out += n - sent
            sent = n
            if die and chunks_out >= _DIE_AFTER_CHUNKS:
                await resp.write(b"".join(parts))
                self.engine.abort(rid)
                self._streams.pop(rid, None)
                if request.transport is not None:
                    request.transport.close()
                return resp
            if stream.finished and stream.error:
                parts.append(b"data: " + json.dumps({"error": {"message": _KV_LOAD_FAILED, "type": "InternalServerError",
                                                              "param": None, "code": 500}}).encode() + b"\n\n")
                parts.append(b"data: [DONE]\n\n")
                await resp.write(b"".join(parts))
                break
            if stream.finished:
                if include_usage:
                    parts.append(
                        (f'data: {head}"choices":[],"usage":{{"prompt_tokens":{n_prompt},'
                         f'"total_tokens":{n_prompt + n},"completion_tokens":{n}}}}}\n\n').encode()
                    )
                parts.append(b"data: [DONE]\n\n")
                await resp.write(b"".join(parts))
                break
            await resp.write(b"".join(parts))
        await resp.write_eof()
        return resp

    # ---- P/D: vLLM NixlConnector's kv_transfer_params ---------------------------------------------------------
    @staticmethod
    def _kv_transfer_params(body: dict[str, Any]) -> dict[str, Any] | None:
        kvp = body.get("kv_transfer_params")
        if kvp is None:
            return None
        if not isinstance(kvp, dict):
            raise _bad_request("kv_transfer_params must be an object", "kv_transfer_params")
        return kvp

    def _apply_kv_params(self, sreq: SimRequest, kvp: dict[str, Any]) -> None:
        from extproc.sim.kvtransfer import transfer_seconds

        if kvp.get("do_remote_decode"):
            sreq.remote_decode = True  # prefill leg: the decode pod will read this prompt's blocks
            return
        if not kvp.get("do_remote_prefill"):
            return
        blocks = kvp.get("remote_block_ids")
        if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
            raise _bad_request("kv_transfer_params.remote_block_ids must be a list of block ids", "kv_transfer_params")
        if not isinstance(kvp.get("remote_engine_id"), str) or not kvp.get("remote_host"):
            raise _bad_request("kv_transfer_params needs remote_engine_id and remote_host", "kv_transfer_params")
        n_prompt = len(sreq.prompt_token_ids)
        tokens = min(len(blocks) * self.profile.block_size, max(n_prompt - 1, 0))
        if tokens <= 0:
            return
        prof = self.profile
        # NixlConnector reads only the blocks the local prefix cache lacks (get_num_new_matched_tokens)
        local = self.engine.cached_prefix_tokens(sreq.prompt_token_ids, sreq.lora)
        secs = transfer_seconds(tokens - local, prof.kv_bytes_per_token // prof.tensor_parallel, self.link)
        sreq.remote_tokens = tokens
        sreq.transfer_s = secs
        sreq.transfer_bytes = max(tokens - local, 0) * prof.kv_bytes_per_token
        sreq.ready_at = sreq.arrival + secs * self.time_scale * self.faults.slow_factor
        sreq.remote_failed = self.kv_failure_rate > 0 and self._kv_rng.random() < self.kv_failure_rate
        sreq.failure_policy = self.kv_load_failure_policy
        st = self.engine.stats
        st.kv_transfer_seconds_total += secs

    # ---- other endpoints --------------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        f = self.faults
        if f.metrics_delay_s > 0:
            await asyncio.sleep(f.metrics_delay_s)
        if f.metrics_fail:
            return web.Response(status=500, text="simulated metrics failure (fault injection)")
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    def _model_card(self, mid: str, root: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": mid, "object": "model", "created": self._created, "owned_by": "vllm", "root": root,
            "parent": parent, "max_model_len": self.engine.max_model_len,
            "permission": [{
                "id": f"modelperm-{mid}", "object": "model_permission", "created": self._created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False,
            }],
        }

    async def _models(self, request: web.Request) -> web.Response:
        data = [self._model_card(self.model, self.model, None)]
        data += [self._model_card(name, f"/adapters/{name}", self.model) for name in self.loras]
        return web.json_response({"object": "list", "data": data})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        self._resolve_model(body)
        if "messages" in body:
            ids = self._chat_ids(body)
        elif "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise _bad_request("prompt must be a string", "prompt")
            ids = self._tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        else:
            raise _bad_request("Field required: prompt or messages", "prompt")
        strs = self._tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
        return web.json_response(
            {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        self._resolve_model(body)
        toks = body.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            raise _bad_request("tokens must be a list of integers", "tokens")
        return web.json_response({"prompt": self._tokenizer.decode(toks)})

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"model_path": self.model, "tokenizer_path": None, "is_generation": True, "preferred_sampling_params": None,
             "weight_version": "default", "has_image_understanding": False, "has_audio_understanding": False,
             "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        )

    async def _server_info(self, request: web.Request) -> web.Response:
        p = self.profile
        eng = self.engine
        return web.json_response(
            {"model_path": self.model, "served_model_name": self.model, "host": self.host, "port": self.port,
             "max_total_num_tokens": p.kv_capacity_tokens, "max_running_requests": p.max_num_seqs,
             "chunked_prefill_size": p.max_num_batched_tokens, "page_size": p.block_size,
             "context_length": eng.max_model_len, "max_loras_per_batch": p.max_loras,
             "lora_paths": list(self.loras), "version": "vllm-sim", "profile": p.name,
             "internal_states": [{"num_running_reqs": eng.num_running, "num_waiting_reqs": eng.num_waiting,
                                  "kv_cache_usage": eng.kv_usage}]}
        )

    async def _get_load(self, request: web.Request) -> web.Response:
        eng = self.engine
        return web.json_response(
            {"load": eng.num_running + eng.num_waiting, "num_reqs": eng.num_running + eng.num_waiting,
             "num_running_reqs": eng.num_running, "num_waiting_reqs": eng.num_waiting,
             "num_tokens": eng.num_tokens_in_flight(), "kv_cache_usage": eng.kv_usage}
        )

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        body = await self._json_body(request)
        self._resolve_model(body)
        ids = self._chat_ids(body) if chat else self._prompt_ids(body)
        max_tokens = self._max_tokens(body, chat)
        return web.json_response(
            {"request_id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "model": body.get("model") or self.model,
             "token_ids": ids, "prompt_token_ids": ids,
             "sampling_params": {"max_tokens": max_tokens, "ignore_eos": True}}
        )

    async def _render_completions(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=False)

    async def _render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=True)
