"""The contract between the scheduler and Envoy, defined once: header names, metadata namespace, Envoy's buffer
formula and the defaults that both sides (``extproc serve`` and ``extproc envoy-config``) and the harness must agree on.

The server (``extproc.server``), the Envoy config renderer (``extproc.envoy_config``) and the harness
(``extproc.harness``) import these; none of them spells a value of its own. This module imports nothing from
the package, so every layer may use it.
"""

from __future__ import annotations

from typing import Literal, get_args

# Request headers the scheduler sets for Envoy and the upstream (GIE's names where GIE has one).
DESTINATION_HEADER = "x-gateway-destination-endpoint"  # the picked pod, ``host:port``
SERVED_HEADER = "x-gateway-destination-endpoint-served"  # the pod that served (response side)
SUBSET_HEADER = "x-gateway-destination-endpoint-subset"  # candidates a client-side subset restricts to
REQUEST_ID_HEADER = "x-extproc-request-id"
PREFILLER_HEADER = "x-prefiller-host-port"  # P/D disaggregation: the prefill pod the decode sidecar calls
ENCODER_HEADER = "x-encoder-hosts-ports"  # E/P/D: the encode pods the decode sidecar calls
OBSERVE_HEADER = "x-extproc-observe"  # the scheduler samples this request for the observation stream
# Sheddable (batch-band) requests: the free batch slots of the model's pods right after this request was admitted
# (the scheduler sets it on the upstream request; Envoy echoes it on the response, like the served header).
BATCH_HEADROOM_HEADER = "x-gateway-batch-headroom"

# Dynamic-metadata namespace of the routing answer (the destination list, comma-separated = ordered fallbacks).
LB_METADATA_NAMESPACE = "envoy.lb"

# Request bodies above this get a JSON 413 from the scheduler.
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# Headers, framing and a body somewhat over the scheduler's limit must still reach the scheduler
# (it answers 413 with a JSON body); only far larger bodies hit Envoy's own buffer limit.
BUFFER_HEADROOM_BYTES = 1024 * 1024
# Seconds between /metrics scrapes per pod.
DEFAULT_SCRAPE_INTERVAL_S = 0.05

# ext_proc timers (must match between ``extproc serve`` and ``extproc envoy-config``). Envoy fails a request whose
# ext_proc message is unanswered after ``message_timeout`` (a hung or dead scheduler: detected in 2 s). A request
# held in the flow-control queue answers later on purpose: before waiting, the scheduler sends Envoy
# ``override_message_timeout`` (the queue TTL + 1 s, at most this cap), which Envoy honours only up to the filter's
# ``max_message_timeout``. A queue TTL above the cap is cut to it (a warning at config load).
DEFAULT_MESSAGE_TIMEOUT_S = 2.0
MAX_MESSAGE_TIMEOUT_S = 60.0

# How response data reaches the scheduler (must match between ``extproc serve`` and ``extproc envoy-config``).
ResponseObserve = Literal["observability", "streamed", "none"]
RESPONSE_OBSERVE_MODES: tuple[str, ...] = get_args(ResponseObserve)
DEFAULT_RESPONSE_OBSERVE: ResponseObserve = "observability"


def envoy_buffer_limit_bytes(max_body_bytes: int) -> int:
    """Envoy's per-connection buffer for a scheduler body limit: the body plus max(body, 1 MiB), so a body over
    the limit still reaches the scheduler whole and gets its JSON 413."""
    return max_body_bytes + max(max_body_bytes, BUFFER_HEADROOM_BYTES)
