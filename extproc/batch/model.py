"""OpenAI Batch API shapes: ids, the file and batch objects, errors, and line-by-line input validation.

Facts from the OpenAI Batch API reference and llm-d-batch-gateway (``internal/shared/openai/batch.go``,
``internal/shared/batchinput/line.go``): input lines ``{custom_id, method: POST, url, body}``, custom_id
unique per file, ``body.model`` required, ``stream: true`` rejected, at most 50,000 lines a job, metadata of at
most 16 keys (key ≤ 64 chars, value ≤ 512 chars).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ALLOWED_URLS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_LINES = 50_000
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_ERRORS_IN_BATCH = 100  # validation errors listed in the batch object (all of them go to the error file)

# statuses (OpenAI): validating → in_progress → finalizing → completed; failed; expired; cancelling → cancelled
VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = "validating", "in_progress", "finalizing", "completed"
FAILED, EXPIRED, CANCELLING, CANCELLED = "failed", "expired", "cancelling", "cancelled"
STATUSES: tuple[str, ...] = (VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED, FAILED, EXPIRED, CANCELLING, CANCELLED)
TERMINAL: frozenset[str] = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})
ACTIVE: frozenset[str] = frozenset({VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING})

_WINDOW_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now_s() -> int:
    return int(time.time())


class ApiError(Exception):
    """An OpenAI-shaped error: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:  # noqa: A002
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_window(value: Any) -> float:
    """``completion_window`` in seconds. OpenAI accepts only "24h"; like llm-d we accept any duration
    ``<number><ms|s|m|h|d>`` between 1 s and 7 days."""
    if not isinstance(value, str):
        raise ApiError(400, "completion_window must be a string such as '24h'", param="completion_window", code="invalid_completion_window")
    m = _WINDOW_RE.match(value)
    if not m:
        raise ApiError(400, f"invalid completion_window {value!r}: expected a duration such as '24h', '30m', '90s'", param="completion_window", code="invalid_completion_window")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not 1.0 <= seconds <= 7 * 86400.0:
        raise ApiError(400, f"completion_window {value!r} must be between 1s and 7d", param="completion_window", code="invalid_completion_window")
    return seconds


def check_metadata(md: Any) -> dict[str, str] | None:
    if md is None:
        return None
    if not isinstance(md, dict):
        raise ApiError(400, "metadata must be an object of string keys and values", param="metadata", code="invalid_metadata")
    if len(md) > MAX_METADATA_KEYS:
        raise ApiError(400, f"metadata has {len(md)} keys; at most {MAX_METADATA_KEYS} are allowed", param="metadata", code="invalid_metadata")
    for k, v in md.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ApiError(400, "metadata keys and values must be strings", param="metadata", code="invalid_metadata")
        if len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE:
            raise ApiError(400, f"metadata key {k[:80]!r}: keys are at most {MAX_METADATA_KEY} characters, values at most {MAX_METADATA_VALUE}", param="metadata", code="invalid_metadata")
    return dict(md)


@dataclass(slots=True)
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None = None

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at, "filename": self.filename,
            "purpose": self.purpose, "status": "processed", "expires_at": self.expires_at, "status_details": None,
        }  # fmt: skip


@dataclass(slots=True)
class BatchRecord:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    fairness_id: str = ""
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    seq: int = 0  # creation order (list pagination)

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": self.in_progress_at, "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at, "failed_at": self.failed_at,
            "expired_at": self.expired_at, "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }  # fmt: skip


@dataclass(slots=True)
class Line:
    """One validated input line, as stored in the queue."""

    idx: int  # 0-based line number in the input file
    custom_id: str
    url: str
    body: dict[str, Any]
    model: str
    group: str  # model + shared-prefix hash: lines of one group are dispatched together (prefix-cache reuse)


@dataclass(slots=True)
class LineError:
    line: int  # 1-based, as OpenAI reports it
    custom_id: str | None
    code: str
    message: str
    param: str | None = None

    def to_api(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(slots=True)
class Validation:
    lines: list[Line] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)


def prefix_group(model: str, url: str, body: dict[str, Any], chars: int = 512) -> str:
    """Group key: the model and a hash of the shared prefix (the system message, else the start of the
    prompt/input). Lines sorted by it reach a pod while its prefix is still cached."""
    prefix = ""
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
        first = msgs[0]
        content = first.get("content")
        prefix = f"{first.get('role', '')}:{content if isinstance(content, str) else json.dumps(content, sort_keys=True)}"
    else:
        p = body.get("prompt", body.get("input", ""))
        prefix = p if isinstance(p, str) else json.dumps(p)
    h = hashlib.blake2b(prefix[:chars].encode("utf-8", "replace"), digest_size=8).hexdigest()
    return f"{model}|{h}"


def iter_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(0-based line number, raw line) for each non-empty line (a final newline is optional)."""
    for i, raw in enumerate(data.split(b"\n")):
        if raw.strip():
            yield i, raw


def validate_input(data: bytes, endpoint: str, *, max_lines: int = MAX_LINES) -> Validation:
    """Validate every line of a batch input file against ``endpoint``; collect every error (not only the first)."""
    v = Validation()
    seen: set[str] = set()
    n = 0
    for i, raw in iter_lines(data):
        n += 1
        if n > max_lines:
            v.errors.append(LineError(i + 1, None, "too_many_lines", f"the input file has more than {max_lines} lines (the limit of one batch)"))
            break
        err = _check_line(i, raw, endpoint, seen, v)
        if err is not None:
            v.errors.append(err)
    if n == 0:
        v.errors.append(LineError(1, None, "empty_file", "the input file has no requests"))
    return v


def _check_line(i: int, raw: bytes, endpoint: str, seen: set[str], v: Validation) -> LineError | None:
    ln = i + 1
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return LineError(ln, None, "invalid_json_line", f"line {ln} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return LineError(ln, None, "invalid_json_line", f"line {ln} must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(ln, None, "missing_required_parameter", f"line {ln}: custom_id must be a non-empty string", "custom_id")
    if len(cid) > 512:
        return LineError(ln, cid[:64], "invalid_value", f"line {ln}: custom_id is longer than 512 characters", "custom_id")
    if cid in seen:
        return LineError(ln, cid, "duplicate_custom_id", f"line {ln}: custom_id {cid!r} appears more than once in the file", "custom_id")
    seen.add(cid)
    method = obj.get("method")
    if method != "POST":
        return LineError(ln, cid, "invalid_method", f"line {ln}: method must be \"POST\", not {method!r}", "method")
    url = obj.get("url")
    if url not in ALLOWED_URLS:
        return LineError(ln, cid, "invalid_url", f"line {ln}: url {url!r} is not one of {', '.join(ALLOWED_URLS)}", "url")
    if url != endpoint:
        return LineError(ln, cid, "mismatched_endpoint", f"line {ln}: url {url!r} does not match the batch endpoint {endpoint!r}", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(ln, cid, "missing_required_parameter", f"line {ln}: body must be a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return LineError(ln, cid, "missing_required_parameter", f"line {ln}: body.model must be a non-empty string", "body.model")
    if body.get("stream") not in (None, False):
        return LineError(ln, cid, "unsupported_value", f"line {ln}: body.stream must be false or absent in a batch", "body.stream")
    v.lines.append(Line(i, cid, url, body, model, prefix_group(model, url, body)))
    return None


def output_line(custom_id: str, status_code: int, request_id: str, body: Any) -> dict[str, Any]:
    """One line of the output file (a response from the model server, any status)."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}


def error_line(custom_id: str | None, code: str, message: str, response: dict[str, Any] | None = None) -> dict[str, Any]:
    """One line of the error file."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": response, "error": {"code": code, "message": message}}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
