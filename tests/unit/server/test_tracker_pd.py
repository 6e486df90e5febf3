"""Both P/D legs count in in-flight accounting: the prefill pod until the decode pod answers."""

from __future__ import annotations

import json

from extproc.api import parse_request
from extproc.datalayer.endpoint import Endpoint
from extproc.server.tracker import FlightTracker


def _req() -> object:
    return parse_request("/v1/completions", json.dumps({"model": "m", "prompt": "x" * 400, "max_tokens": 5}).encode(), {})


def test_prefill_leg_accounted_until_response_headers() -> None:
    seen = []
    tr = FlightTracker(lambda req, obs: seen.append(obs))
    d, p = Endpoint("10.0.0.2:8000"), Endpoint("10.0.0.1:8000")
    f = tr.dispatch(_req(), d, None, p)  # type: ignore[arg-type]
    assert (d.inflight, p.inflight, p.inflight_prefill_tokens) == (1, 1, 100)
    f.on_response_headers(200, prefill_ms=42.5)
    assert (d.inflight, p.inflight, p.inflight_prefill_tokens) == (1, 0, 0)
    tr.finish(f, "ok")
    assert (d.inflight, d.inflight_prefill_tokens, p.inflight) == (0, 0, 0)
    assert seen[0].prefill_endpoint == "10.0.0.1:8000" and seen[0].prefill_ms == 42.5


def test_prefill_leg_released_when_request_fails_early() -> None:
    tr = FlightTracker(lambda req, obs: None)
    d, p = Endpoint("10.0.0.2:8000"), Endpoint("10.0.0.1:8000")
    f = tr.dispatch(_req(), d, None, p)  # type: ignore[arg-type]
    tr.finish(f, "reset_before_response")
    assert (d.inflight, p.inflight, p.inflight_prefill_tokens) == (0, 0, 0)


def test_split_request_charges_no_prefill_tokens_to_the_decode_pod() -> None:
    """The decode pod of a split only READs the KV: its prompt tokens in flight are local prefill work only (what
    queue-aware-pd-decider and the predictor read); it still counts the request in flight throughout."""
    tr = FlightTracker(lambda req, obs: None)
    d, p = Endpoint("10.0.0.2:8000"), Endpoint("10.0.0.1:8000")
    f = tr.dispatch(_req(), d, None, p)  # type: ignore[arg-type]
    local = tr.dispatch(_req(), d)  # type: ignore[arg-type]
    assert (d.inflight, d.inflight_prefill_tokens, p.inflight_prefill_tokens) == (2, 100, 100)
    f.on_response_headers(200, prefill_ms=10.0)
    assert (d.inflight_prefill_tokens, p.inflight, p.inflight_prefill_tokens) == (100, 0, 0)
    tr.finish(f, "ok")
    tr.finish(local, "ok")
    assert (d.inflight, d.inflight_prefill_tokens, d.inflight_decode_tokens, p.inflight) == (0, 0, 0, 0)
