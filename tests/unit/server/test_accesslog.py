"""End of request from Envoy's gRPC access log; the observation stream only on a sample."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2
from extproc.api import parse_request
from extproc.datalayer.endpoint import Endpoint
from extproc.envoy_config import find_envoy_binary
from extproc.server.accesslog import AccessLogReceiver, ObservationSampler
from extproc.server.tracker import FlightTracker

pytestmark = pytest.mark.timeout(90)


def _have_envoy() -> bool:
    try:
        find_envoy_binary()
    except Exception:
        return False
    return True


def _flight(tracker: FlightTracker, ep: Endpoint) -> Any:
    req = parse_request("/v1/completions", b'{"model":"m","prompt":"hello","max_tokens":4}', {})
    return tracker.dispatch(req, ep)


def _entry(key: str, status: int | None, *, end_after_s: float = 0.002, disconnect: bool = False) -> Any:
    e = al.HTTPAccessLogEntry()
    e.request.request_headers["x-extproc-request-id"] = key
    if status is not None:
        e.response.response_code.value = status
    cp = e.common_properties
    cp.start_time.FromNanoseconds(int(time.time() * 1e9) - 5_000_000)
    cp.time_to_last_downstream_tx_byte.FromNanoseconds(int(end_after_s * 1e9))
    cp.response_flags.downstream_connection_termination = disconnect
    return e


def test_access_log_finishes_flights_with_envoys_timing_and_outcomes() -> None:
    outcomes: list[str] = []
    done: list[Any] = []
    tracker = FlightTracker(lambda req, obs: done.append(obs), outcomes.append)
    ep = Endpoint("10.0.0.1:8000")
    f_ok, f_err, f_dc, f_obs = (_flight(tracker, ep) for _ in range(4))
    f_obs.observed = True  # its observation stream owns it
    f_ok.obs.dispatch_ts -= 1.0  # dispatched a second ago
    assert ep.inflight == 4
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend([
        _entry(f_ok.key, 200), _entry(f_err.key, 503), _entry(f_dc.key, None, disconnect=True), _entry(f_obs.key, 200),
        _entry("not-a-flight", 200), _entry(f_ok.key, 200),  # unknown and duplicate entries are ignored
    ])  # fmt: skip
    rx = AccessLogReceiver(tracker)
    rx.on_message(msg)
    assert outcomes == ["ok", "status_503", "disconnected"]
    assert ep.inflight == 1 and len(tracker) == 1 and not f_obs.finished
    assert ep.scrape_failures == 1  # the 503 hints the health logic
    ok_obs = done[0]
    # completion time comes from Envoy's timing (start + 2 ms, ~3 ms ago), not from when the batch arrived
    assert ok_obs.status == 200 and time.monotonic() - 0.5 < ok_obs.complete_ts <= time.monotonic() - 0.002
    assert done[1].complete_ts >= done[1].dispatch_ts  # never before the dispatch
    assert rx.finished == 3 and rx.entries == 6


def test_an_observed_request_that_was_cut_ends_with_its_access_log_entry() -> None:
    """The client left (or the request was reset before any response): the access-log entry ends the flight even
    though an observation stream is attached — Envoy closes that stream only after its deferred_close_timeout
    (5 s), and the pod's slot is free now. A normal end stays the observation stream's (TTFT, tokens)."""
    outcomes: list[str] = []
    tracker = FlightTracker(lambda req, obs: None, outcomes.append)
    ep = Endpoint("10.0.0.1:8000")
    f_dc, f_reset, f_ok = (_flight(tracker, ep) for _ in range(3))
    for f in (f_dc, f_reset, f_ok):
        f.observed = True
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend([_entry(f_dc.key, 200, disconnect=True), _entry(f_reset.key, None), _entry(f_ok.key, 200)])
    AccessLogReceiver(tracker).on_message(msg)
    assert outcomes == ["disconnected", "reset_before_response"]
    assert f_dc.finished and f_reset.finished and not f_ok.finished and ep.inflight == 1


def test_foreign_observation_gives_the_owner_a_full_sample_and_the_access_log_waits_for_it() -> None:
    """Replicas: a sampled flight's access-log entry waits OBSERVATION_GRACE_S for the observation another replica
    forwards; the observation applies TTFT (wall clock → our monotonic clock), tokens and status and ends the
    flight; an entry whose observation never comes ends the flight after the grace, without a TTFT."""
    from extproc.server import accesslog as alm

    async def run() -> None:
        done: list[Any] = []
        outcomes: list[str] = []
        tracker = FlightTracker(lambda req, obs: done.append(obs), outcomes.append)
        ep = Endpoint("10.0.0.1:8000")
        req = parse_request("/v1/completions", b'{"model":"m","prompt":"hello","max_tokens":4,"stream":true}', {})
        f1, f2 = tracker.dispatch(req, ep), tracker.dispatch(req, ep)
        f1.sampled = f2.sampled = True
        f1.obs.dispatch_ts -= 1.0  # dispatched a second ago
        rx = AccessLogReceiver(tracker)
        rx.forward = lambda *a: True  # replicated
        old = alm.OBSERVATION_GRACE_S
        alm.OBSERVATION_GRACE_S = 0.2
        try:
            msg = als_pb2.StreamAccessLogsMessage()
            msg.http_logs.log_entry.extend([_entry(f1.key, 200), _entry(f2.key, 200)])
            rx.on_message(msg)
            assert rx.deferred == 2 and not f1.finished and not f2.finished and outcomes == []
            now = time.time()
            tail = b'data: {"choices":[{"text":"a"}],"usage":{"completion_tokens":4}}\n\ndata: [DONE]\n\n'
            rx.finish_forwarded_observation(f1.key, 200, "", now, False, now - 0.05, 0.0, 6, tail)
            assert f1.finished and outcomes == ["ok"] and rx.observations == 1
            o = done[0]
            # TTFT from the forwarded wall time: first chunk 50 ms before the end, ~0.95 s after the dispatch
            assert 0.03 < o.complete_ts - o.first_token_ts < 0.2 and 0.8 < o.ttft_ms / 1000 < 1.0
            assert o.output_tokens == 4 and o.status == 200
            assert ep.inflight == 1
            await asyncio.sleep(0.35)  # f2: no observation came; the access log ends it after the grace
            assert f2.finished and outcomes == ["ok", "ok"] and not done[1].first_token_ts
            assert ep.inflight == 0
            # a late observation for a finished flight is ignored
            rx.finish_forwarded_observation(f2.key, 200, "", now, False, now, 0.0, 1, b"")
            assert rx.observations == 1 and len(done) == 2
        finally:
            alm.OBSERVATION_GRACE_S = old

    asyncio.run(run())


def test_sampler_budget() -> None:
    s = ObservationSampler(100.0)
    n = sum(s.sample() for _ in range(10_000))  # a burst far above the budget: about the burst size passes
    assert 1 <= n <= 15
    assert ObservationSampler(-1).sample() and not ObservationSampler(0).sample()


@pytest.mark.skipif(not _have_envoy(), reason="envoy binary not installed")
@pytest.mark.parametrize("budget,expect_als", [("0", True), ("-1", False)])
async def test_through_envoy_every_flight_ends_by_access_log_or_observation(budget: str, expect_als: bool) -> None:
    from extproc.bench.fakepods import FakePods
    from extproc.harness import Stack, StackSpec

    async with FakePods(2, models=["sim-llama"]) as pods:
        spec = StackSpec(endpoints=pods.endpoints, config="default", in_process=True, scheduler_args=["--observe-budget", budget])
        async with Stack(spec) as st:
            srv = st.server
            rx = srv.access_log
            async with aiohttp.ClientSession() as s:

                async def one(k: int) -> None:
                    body = {"model": "sim-llama", "prompt": f"p{k}", "max_tokens": 1}
                    async with s.post(f"{st.url}/v1/completions", json=body, headers={"x-extproc-observe": "1"}) as r:
                        assert r.status == 200
                        await r.read()

                # requests sent before Envoy's access-log stream has connected are observed (nothing else would end
                # them): warm up until it is connected, then count only what follows
                for k in range(100):
                    if rx.ever_connected:
                        break
                    await one(-1 - k)
                    await asyncio.sleep(0.05)
                assert rx.ever_connected
                for _ in range(250):  # let the warm-up flights and their log entries drain
                    if len(srv.tracker) == 0:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)
                base_entries, base_finished = rx.entries, rx.finished
                for k in range(30):
                    await one(k)
            # Envoy flushes its gRPC access log on its own timer: wait for the entries as well as for the flights
            for _ in range(250):
                if len(srv.tracker) == 0 and rx.entries - base_entries >= 30:
                    break
                await asyncio.sleep(0.02)
            assert len(srv.tracker) == 0 and all(e.inflight == 0 for e in srv.pool.snapshot())
            assert rx.entries - base_entries >= 30
            if expect_als:
                # once the access log is connected it ends every flight, and a client-sent x-extproc-observe header
                # did not buy an observation stream
                assert rx.finished - base_finished >= 30
            else:
                assert rx.finished == 0
