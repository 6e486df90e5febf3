"""upb-backed protobuf helpers for the ext_proc hot path (xds-protos' generated ``_pb2`` classes).

Measured ~40–200× cheaper than betterproto/pydantic messages (see shared reference), so every per-request
message is built here with the C-backed classes.
"""

from __future__ import annotations

from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc import contract

ProcessingRequest = pb.ProcessingRequest
ProcessingResponse = pb.ProcessingResponse

# The Envoy contract's names (defined once in extproc.contract)
HDR_DESTINATION = contract.DESTINATION_HEADER
HDR_SERVED = contract.SERVED_HEADER
HDR_SUBSET = contract.SUBSET_HEADER
HDR_REQUEST_ID = contract.REQUEST_ID_HEADER
HDR_PREFILLER = contract.PREFILLER_HEADER  # P/D: the prefill pod (set only by the disagg-profile-handler)
HDR_OBSERVE = contract.OBSERVE_HEADER  # set on sampled requests: selects the route with the observation filter on
# GIE conformance hooks (honoured only with ``extproc serve --conformance``): the request header restricts the
# candidates to the listed addresses, the response header echoes the endpoint that served
HDR_CONFORMANCE_SELECTION = "test-epp-endpoint-selection"
HDR_CONFORMANCE_SERVED = "x-conformance-test-served-endpoint"
# Headers a client may never send upstream: stripped from every request, whatever the config
HDR_BATCH_HEADROOM = contract.BATCH_HEADROOM_HEADER  # sheddable requests: free batch slots after admission
ROUTING_HEADERS = (HDR_DESTINATION, HDR_SERVED, HDR_SUBSET, HDR_PREFILLER, HDR_BATCH_HEADROOM)
LB_NAMESPACE = contract.LB_METADATA_NAMESPACE

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def headers_to_dict(hm: object) -> dict[str, str]:
    """HeaderMap → {lower-case name: value}. Envoy sends ``raw_value`` (bytes) in recent versions."""
    out: dict[str, str] = {}
    for h in hm.headers:  # type: ignore[attr-defined]
        v = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        k = h.key.lower()
        if k in out:
            out[k] = out[k] + "," + v
        else:
            out[k] = v
    return out


def _set(mutation: pb.HeaderMutation, key: str, value: str) -> None:  # type: ignore[name-defined]
    o = mutation.set_headers.add()
    o.header.key = key
    o.header.raw_value = value.encode()
    o.append_action = _OVERWRITE


def request_headers_continue(remove: tuple[str, ...] = ROUTING_HEADERS) -> pb.ProcessingResponse:
    r = pb.ProcessingResponse()
    cr = r.request_headers.response
    cr.header_mutation.remove_headers.extend(remove)
    return r


def route_response(
    targets: list[str],
    request_id: str,
    *,
    from_body: bool,
    body: bytes | None = None,
    remove: tuple[str, ...] = (),
    headers: dict[str, str] | None = None,
) -> pb.ProcessingResponse:
    """The routing answer: header + ``envoy.lb`` metadata (comma list = ordered fallbacks), optionally a new body
    and extra upstream request headers (the profile handler's, e.g. ``x-prefiller-host-port``)."""
    r = pb.ProcessingResponse()
    cr = r.request_body.response if from_body else r.request_headers.response
    hm = cr.header_mutation
    _set(hm, HDR_DESTINATION, targets[0])
    _set(hm, HDR_REQUEST_ID, request_id)
    if headers:
        for k, v in headers.items():
            _set(hm, k, v)
    if remove:
        hm.remove_headers.extend(remove)
    if body is not None:
        cr.body_mutation.body = body
        _set(hm, "content-length", str(len(body)))
    cr.clear_route_cache = True
    md = r.dynamic_metadata
    ns = md.fields[LB_NAMESPACE].struct_value
    ns.fields[HDR_DESTINATION].string_value = ",".join(targets)
    return r


def immediate(status: int, body: bytes, extra_headers: dict[str, str] | None = None) -> pb.ProcessingResponse:
    r = pb.ProcessingResponse()
    ir = r.immediate_response
    ir.status.code = status  # type: ignore[assignment]
    ir.body = body
    _set(ir.headers, "content-type", "application/json")
    for k, v in (extra_headers or {}).items():
        _set(ir.headers, k, v)
    ir.details = f"extproc_{status}"
    return r


def response_headers_continue(served: str | None, conformance: bool = False) -> pb.ProcessingResponse:
    r = pb.ProcessingResponse()
    cr = r.response_headers.response
    cr.SetInParent()  # a bare CONTINUE must still set the response_headers oneof
    if served:
        _set(cr.header_mutation, HDR_SERVED, served)
        if conformance:
            _set(cr.header_mutation, HDR_CONFORMANCE_SERVED, served)
    return r


def request_body_continue() -> pb.ProcessingResponse:
    r = pb.ProcessingResponse()
    r.request_body.response.SetInParent()
    return r


def response_body_continue(metadata: list[tuple[str, str, object]] | None = None) -> pb.ProcessingResponse:
    """CONTINUE for a response body chunk, optionally with dynamic metadata (namespace, key, value) for Envoy."""
    r = pb.ProcessingResponse()
    r.response_body.response.SetInParent()
    if metadata:
        md = r.dynamic_metadata
        for ns, key, value in metadata:
            f = md.fields[ns].struct_value.fields[key]
            if isinstance(value, bool):
                f.bool_value = value
            elif isinstance(value, (int, float)):
                f.number_value = float(value)
            else:
                f.string_value = str(value)
    return r


def extend_message_timeout(seconds: float) -> pb.ProcessingResponse:
    """``override_message_timeout`` only: Envoy restarts the current message's timer with ``seconds`` (honoured up
    to the filter's ``max_message_timeout``; once per message; ignored when that is unset)."""
    r = pb.ProcessingResponse()
    r.override_message_timeout.FromMilliseconds(max(1, int(seconds * 1000)))
    return r


def request_trailers_continue() -> pb.ProcessingResponse:
    r = pb.ProcessingResponse()
    r.request_trailers.SetInParent()
    return r


def response_trailers_continue() -> pb.ProcessingResponse:
    r = pb.ProcessingResponse()
    r.response_trailers.SetInParent()
    return r


__all__ = [
    "ProcessingRequest",
    "ProcessingResponse",
    "headers_to_dict",
    "route_response",
    "immediate",
    "extend_message_timeout",
    "struct_pb2",
    "http_status_pb2",
]
