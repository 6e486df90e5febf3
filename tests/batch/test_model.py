"""Input validation, the batch object's shape, completion windows, metadata and the AIMD limiter."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from extproc.batch import model as m
from extproc.batch.dispatch import Aimd, DispatchConfig


def _line(i: int, **over: object) -> dict[str, object]:
    d: dict[str, object] = {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}
    d.update(over)
    return d


def _file(*lines: object) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def test_valid_file_gives_lines_in_order() -> None:
    v = m.validate_input(_file(*(_line(i) for i in range(5))), "/v1/chat/completions")
    assert not v.errors
    assert [ln.custom_id for ln in v.lines] == [f"c{i}" for i in range(5)]
    assert [ln.idx for ln in v.lines] == list(range(5))


@pytest.mark.parametrize(
    ("bad", "code", "param"),
    [
        ("{not json", "invalid_json_line", None),
        ("[1, 2]", "invalid_json_line", None),
        (_line(0, custom_id=""), "missing_required_parameter", "custom_id"),
        (_line(0, custom_id=7), "missing_required_parameter", "custom_id"),
        (_line(0, method="GET"), "invalid_method", "method"),
        (_line(0, url="/v1/models"), "invalid_url", "url"),
        (_line(0, url="/v1/completions"), "mismatched_endpoint", "url"),
        (_line(0, body="x"), "missing_required_parameter", "body"),
        (_line(0, body={"messages": []}), "missing_required_parameter", "body.model"),
        (_line(0, body={"model": "m", "stream": True}), "unsupported_value", "body.stream"),
    ],
)
def test_each_bad_line_is_reported_with_its_line_number(bad: object, code: str, param: str | None) -> None:
    v = m.validate_input(_file(_line(1), _line(2), bad if not isinstance(bad, dict) else {**bad, "custom_id": bad.get("custom_id", "x")}), "/v1/chat/completions")
    assert len(v.errors) == 1
    e = v.errors[0]
    assert (e.line, e.code, e.param) == (3, code, param)
    assert "line 3" in e.message


def test_duplicate_custom_id_and_every_error_collected() -> None:
    v = m.validate_input(_file(_line(1), _line(1), "oops", _line(2, method="PUT")), "/v1/chat/completions")
    assert [(e.line, e.code) for e in v.errors] == [(2, "duplicate_custom_id"), (3, "invalid_json_line"), (4, "invalid_method")]


def test_line_cap_and_empty_file() -> None:
    v = m.validate_input(_file(*(_line(i) for i in range(11))), "/v1/chat/completions", max_lines=10)
    assert v.errors[-1].code == "too_many_lines"
    assert m.validate_input(b"\n\n", "/v1/chat/completions").errors[0].code == "empty_file"


def test_blank_lines_are_skipped_and_numbers_stay_true() -> None:
    v = m.validate_input(_file(_line(0), "", _line(1, method="GET")), "/v1/chat/completions")
    assert [(e.line, e.code) for e in v.errors] == [(3, "invalid_method")]


@pytest.mark.parametrize(("w", "s"), [("24h", 86400.0), ("30m", 1800.0), ("90s", 90.0), ("1d", 86400.0), ("1500ms", 1.5)])
def test_completion_window(w: str, s: float) -> None:
    assert m.parse_window(w) == s


@pytest.mark.parametrize("w", ["", "24", "h", "0s", "8d", 24, None, "24 hours"])
def test_bad_completion_window(w: object) -> None:
    with pytest.raises(m.ApiError) as ei:
        m.parse_window(w)
    assert ei.value.status == 400 and ei.value.param == "completion_window"


def test_metadata_limits() -> None:
    assert m.check_metadata({"a": "b"}) == {"a": "b"}
    for bad in ({str(i): "v" for i in range(17)}, {"k": 1}, {"k" * 65: "v"}, {"k": "v" * 513}, ["x"]):
        with pytest.raises(m.ApiError):
            m.check_metadata(bad)


def test_prefix_group_shares_system_prompt() -> None:
    sys_a = {"model": "m", "messages": [{"role": "system", "content": "A" * 100}, {"role": "user", "content": "1"}]}
    sys_a2 = {"model": "m", "messages": [{"role": "system", "content": "A" * 100}, {"role": "user", "content": "2"}]}
    sys_b = {"model": "m", "messages": [{"role": "system", "content": "B" * 100}, {"role": "user", "content": "1"}]}
    other_model = {**sys_a, "model": "n"}
    g = m.prefix_group
    assert g("m", "", sys_a) == g("m", "", sys_a2) != g("m", "", sys_b)
    assert g("n", "", other_model) != g("m", "", sys_a)


def test_batch_object_shape() -> None:
    b = m.BatchRecord(id="batch_1", endpoint="/v1/completions", input_file_id="file-1", completion_window="24h", status=m.VALIDATING, created_at=1, expires_at=2)
    d = b.to_api()
    assert d["object"] == "batch" and d["request_counts"] == {"total": 0, "completed": 0, "failed": 0} and d["errors"] is None
    b.errors = [m.LineError(3, None, "invalid_json_line", "x").to_api()]
    assert b.to_api()["errors"] == {"object": "list", "data": [{"code": "invalid_json_line", "message": "x", "param": None, "line": 3}]}


async def test_aimd_grows_on_success_in_use_and_halves_once_per_burst() -> None:
    a = Aimd(DispatchConfig(gateway="", min_concurrency=2, max_concurrency=10, initial_concurrency=4, decrease_cooldown_s=60))
    assert a.limit == 4
    a.on_success()  # idle limit (nothing in flight): no growth
    assert a.limit == 4
    a.inflight = 3
    a.on_success()
    a.on_success()
    assert a.limit == 6
    a.inflight = 2
    a.on_success()  # 2 of 6 in use: not limited by the limit, no growth
    assert a.limit == 6
    a.on_backoff()
    a.on_backoff()  # same burst: ignored
    assert a.limit == 3 and a.decreases == 1
    a._last_decrease = -1e9
    a.on_backoff()
    assert a.limit == 2  # floor
    a.inflight = 10
    for _ in range(200):
        a.on_success()
    assert a.limit == 10  # ceiling


async def test_aimd_saturated_shed_holds_at_inflight_and_probes_after_an_interval() -> None:
    a = Aimd(DispatchConfig(gateway="", min_concurrency=1, max_concurrency=50, initial_concurrency=20, increase_interval_s=0.05))
    a.inflight = 12
    a.on_saturated()
    assert a.limit == 12 and a.holds == 1
    a.inflight = 11
    a.on_saturated()  # every soft rejection counts (no cooldown): the freed slot is not retaken at once
    assert a.limit == 11
    a.on_success()  # right after a hold: no growth on completions
    assert a.limit == 11
    a.inflight = 10
    a.on_saturated()  # right after a completion: a race with the scheduler's accounting, the limit is kept
    assert a.limit == 11 and a.races == 1
    a._last_ok = -1e9
    a.inflight = 11
    # every slot busy: acquire waits, and after one interval probes one slot more
    t0 = time.monotonic()
    t = asyncio.create_task(a.acquire())
    await asyncio.sleep(0.01)
    assert not t.done()
    await asyncio.wait_for(t, 1)
    assert a.limit == 12 and a.inflight == 12 and time.monotonic() - t0 >= 0.04


async def test_aimd_slots_bound_inflight() -> None:
    a = Aimd(DispatchConfig(gateway="", min_concurrency=1, max_concurrency=2, initial_concurrency=2))
    await a.acquire()
    await a.acquire()
    third = asyncio.create_task(a.acquire())
    await asyncio.sleep(0.01)
    assert not third.done() and a.inflight == 2
    a.release()
    await asyncio.wait_for(third, 1)
    assert a.inflight == 2


async def test_aimd_follows_the_gateway_headroom_and_stops_probing() -> None:
    a = Aimd(DispatchConfig(gateway="", min_concurrency=2, max_concurrency=40, initial_concurrency=5, increase_interval_s=0.02, headroom_ttl_s=60))
    a.on_headroom(sent_inflight=5, free=17)  # admitted at 5 of ours on the wire with 17 slots still free
    assert a.limit == 22 and a.headroom_updates == 1
    a.inflight = 22
    a.on_success()  # the told level is kept: no growth on completions
    assert a.limit == 22
    a.on_headroom(sent_inflight=22, free=0)
    assert a.limit == 22
    a.on_headroom(sent_inflight=20, free=0)  # interactive load took two slots: down, without a 429
    assert a.limit == 20
    a.on_headroom(sent_inflight=1, free=0)
    assert a.limit == 2  # floor
    a.on_headroom(sent_inflight=30, free=30)
    assert a.limit == 40  # ceiling
    # every slot busy: while guided, acquire waits for a free slot instead of probing one more
    a.limit, a.inflight = 10.0, 10
    t = asyncio.create_task(a.acquire())
    await asyncio.sleep(0.1)  # five probe intervals
    assert not t.done() and a.limit == 10
    a.release()
    await asyncio.wait_for(t, 1)
    assert a.inflight == 10 and a.limit == 10
    # the header stops coming (ttl over): AIMD probing again
    a._guided_until = -1e18
    t = asyncio.create_task(a.acquire())
    await asyncio.wait_for(t, 1)
    assert a.limit == 11
