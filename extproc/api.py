"""OpenAI request parsing and validation → ``InferenceRequest``.

The API is chosen by path suffix (as GIE does): ``/v1/chat/completions`` needs ``messages``, ``/v1/completions``
needs ``prompt``, ``/v1/embeddings`` and ``/v1/responses`` need ``input``. Every failure raises ``RequestError``
with the HTTP status and an OpenAI-style error that the server turns into an ImmediateResponse.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from extproc.contract import DEFAULT_MAX_BODY_BYTES

API_CHAT = "chat"
API_COMPLETIONS = "completions"
API_EMBEDDINGS = "embeddings"
API_RESPONSES = "responses"

_PATHS: tuple[tuple[str, str], ...] = (
    ("/chat/completions", API_CHAT),
    ("/completions", API_COMPLETIONS),
    ("/embeddings", API_EMBEDDINGS),
    ("/responses", API_RESPONSES),
)

# Rough characters per token for budgeting when no tokenizer is configured (GIE uses 4 as well).
CHARS_PER_TOKEN = 4


class RequestError(Exception):
    """A request the scheduler refuses, with the HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code or _default_code(status)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


def _default_code(status: int) -> str:
    return {
        400: "bad_request",
        404: "model_not_found",
        413: "request_too_large",
        429: "rate_limited",
        500: "internal_error",
        503: "service_unavailable",
        504: "timeout",
    }.get(status, "error")


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def api_for_path(path: str) -> str | None:
    """Map a request path (query string allowed) to the API kind, or None if it is not an inference path."""
    p = path.split("?", 1)[0].rstrip("/")
    for suffix, api in _PATHS:
        if p.endswith(suffix):
            return api
    return None


@dataclass(slots=True)
class InferenceRequest:
    """A parsed inference request: everything scheduling needs, nothing it does not."""

    request_id: str
    path: str
    api: str
    model: str  # model requested by the client (base model or LoRA adapter name)
    target_model: str  # model after rewrite (x-gateway-model-name-rewrite)
    body: dict[str, Any]
    body_size: int
    prompt_text: str  # text used for prefix hashing: the prompt, or the JSON of the chat messages
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    priority: int = 0
    fairness_id: str = ""
    objective: str = ""
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    headers: dict[str, str] = field(default_factory=dict)
    prompt_token_ids: list[int] | None = None  # filled by a tokenizer when configured (precise prefix)

    @property
    def prompt_tokens_estimate(self) -> int:
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        return max(1, len(self.prompt_text) // CHARS_PER_TOKEN)

    @property
    def sheddable(self) -> bool:
        return self.priority < 0


def new_request_id() -> str:
    return uuid.uuid4().hex


def _require_str(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if v is None:
        raise RequestError(400, f"missing required field '{key}'", code="missing_field")
    if not isinstance(v, str) or not v:
        raise RequestError(400, f"field '{key}' must be a non-empty string", code="invalid_type")
    return v


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(400, f"field '{key}' must be an integer", code="invalid_type")
    if v < 0:
        raise RequestError(400, f"field '{key}' must be >= 0", code="invalid_value")
    return v


def _opt_bool(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise RequestError(400, f"field '{key}' must be a boolean", code="invalid_type")
    return v


def _prompt_text(prompt: Any) -> str:
    """Completions ``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError(400, "field 'prompt' must not be empty", code="invalid_value")
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "".join(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return " ".join(map(str, prompt))
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
            return "\n".join(" ".join(map(str, p)) for p in prompt)
    raise RequestError(400, "field 'prompt' must be a string, a list of strings or a list of token ids", code="invalid_type")


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise RequestError(400, "missing required field 'messages'", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "field 'messages' must be a non-empty list", code="invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object", code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(400, f"messages[{i}].role must be a non-empty string", code="invalid_type")
        content = m.get("content")
        if content is None:
            if role == "assistant" and ("tool_calls" in m or "function_call" in m):
                continue
            raise RequestError(400, f"messages[{i}].content is required", code="missing_field")
        if isinstance(content, str):
            continue
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise RequestError(400, f"messages[{i}].content[{j}] must be an object with a 'type'", code="invalid_type")
                if part["type"] == "text" and not isinstance(part.get("text"), str):
                    raise RequestError(400, f"messages[{i}].content[{j}].text must be a string", code="invalid_type")
            continue
        raise RequestError(400, f"messages[{i}].content must be a string or a list of content parts", code="invalid_type")


def _input_text(value: Any, key: str = "input") -> str:
    if value is None:
        raise RequestError(400, f"missing required field '{key}'", code="missing_field")
    if isinstance(value, str):
        if not value:
            raise RequestError(400, f"field '{key}' must not be empty", code="invalid_value")
        return value
    if isinstance(value, list) and value:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    raise RequestError(400, f"field '{key}' must be a string or a non-empty list", code="invalid_type")


def check_body_size(size: int, limit: int) -> None:
    """The one body-size check: a body over ``limit`` bytes is a 413 ``request_too_large``. The server calls it
    on every chunk as the body streams in (so it answers before buffering more); ``parse_request`` calls it for
    callers that hand it a whole body."""
    if size > limit:
        raise RequestError(413, f"request body exceeds the limit of {limit} bytes ({size} bytes received)")


def parse_request(
    path: str,
    raw: bytes,
    headers: dict[str, str] | None = None,
    *,
    request_id: str | None = None,
    max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
    priority_of_objective: dict[str, int] | None = None,
) -> InferenceRequest:
    """Parse an OpenAI-style request body for ``path``. Raises ``RequestError``. ``max_body_bytes=None``: the
    caller has checked the size already (the server, chunk by chunk)."""
    headers = headers or {}
    api = api_for_path(path)
    if api is None:
        raise RequestError(404, f"unknown inference path '{path.split('?', 1)[0]}'", code="unknown_path")
    if max_body_bytes is not None:
        check_body_size(len(raw), max_body_bytes)
    if not raw:
        raise RequestError(400, "request body is empty; an inference request needs a JSON body", code="empty_body")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise RequestError(400, f"request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object", code="invalid_type")

    model = _require_str(body, "model")
    stream = _opt_bool(body, "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise RequestError(400, "field 'stream_options' must be an object", code="invalid_type")
        include_usage = bool(so.get("include_usage", False))

    if api == API_CHAT:
        messages = body.get("messages")
        _check_messages(messages)
        prompt_text = json.dumps(messages, separators=(",", ":"), ensure_ascii=False)
        max_tokens = _opt_int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens")
    elif api == API_COMPLETIONS:
        if "prompt" not in body:
            raise RequestError(400, "missing required field 'prompt'", code="missing_field")
        prompt_text = _prompt_text(body["prompt"])
        max_tokens = _opt_int(body, "max_tokens")
    elif api == API_EMBEDDINGS:
        prompt_text = _input_text(body.get("input"))
        max_tokens = 0
    else:  # responses
        prompt_text = _input_text(body.get("input"))
        instr = body.get("instructions")
        if isinstance(instr, str):
            prompt_text = instr + prompt_text
        max_tokens = _opt_int(body, "max_output_tokens")

    priority = 0
    objective = headers.get("x-gateway-inference-objective", "")
    if objective and priority_of_objective and objective in priority_of_objective:
        priority = priority_of_objective[objective]
    ph = headers.get("x-gateway-inference-priority")
    if ph:
        try:
            priority = int(ph)
        except ValueError:
            raise RequestError(400, "header 'x-gateway-inference-priority' must be an integer", code="invalid_header") from None

    def _slo(name: str) -> float | None:
        v = headers.get(name)
        if not v:
            return None
        try:
            f = float(v)
        except ValueError:
            raise RequestError(400, f"header '{name}' must be a number of milliseconds", code="invalid_header") from None
        if not (f > 0 and f < 1e9):
            raise RequestError(400, f"header '{name}' must be a positive number of milliseconds", code="invalid_header")
        return f

    rewrite = headers.get("x-gateway-model-name-rewrite", "")
    return InferenceRequest(
        request_id=request_id or headers.get("x-request-id") or new_request_id(),
        path=path,
        api=api,
        model=model,
        target_model=rewrite or model,
        body=body,
        body_size=len(raw),
        prompt_text=prompt_text,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        priority=priority,
        # GIE's header, else llm-d's name for it (program-aware fairness reads x-llm-d-inference-fairness-id)
        fairness_id=headers.get("x-gateway-inference-fairness-id") or headers.get("x-llm-d-inference-fairness-id", ""),
        objective=objective,
        slo_ttft_ms=_slo("x-slo-ttft-ms"),
        slo_tpot_ms=_slo("x-slo-tpot-ms"),
        headers=headers,
    )
