"""The shared-service registry (extproc.services): typed keys, and the start/stop lifecycle the server runs."""

from __future__ import annotations

import asyncio

import pytest

from extproc.services import ServiceKey, Services, is_service


class _Svc:
    def __init__(self, log: list[str], name: str, fail_start: bool = False, fail_stop: bool = False) -> None:
        self.log, self.name, self.fail_start, self.fail_stop = log, name, fail_start, fail_stop

    async def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("cannot start")
        self.log.append(f"start {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.fail_stop:
            raise RuntimeError("cannot stop")


class _SyncStart:
    def start(self) -> None: ...

    async def stop(self) -> None: ...


KEY: ServiceKey[int] = ServiceKey("answer")


def test_typed_keys_are_strings() -> None:
    s = Services({KEY: 42})
    assert s.get(KEY) == 42 and s["answer"] == 42 and s.get(ServiceKey("missing"), 7) == 7
    assert isinstance(s, dict)


def test_start_all_in_order_stop_all_in_reverse_and_only_services() -> None:
    log: list[str] = []
    a, b, skipped = _Svc(log, "a"), _Svc(log, "b", fail_stop=True), _Svc(log, "skipped")
    s = Services(a=a, setting="/tmp/x", sync=_SyncStart(), b=b, skipped=skipped)
    assert not is_service("/tmp/x") and not is_service(_SyncStart()) and is_service(a)
    assert [n for n, _ in s.background(skip=(skipped,))] == ["a", "b"]
    asyncio.run(s.start_all(skip=(skipped,)))
    asyncio.run(s.stop_all())  # b's failing stop does not keep a from stopping
    assert log == ["start a", "start b", "stop b", "stop a"]
    asyncio.run(s.stop_all())  # nothing left to stop
    assert len(log) == 4


def test_failing_start_stops_those_already_started() -> None:
    log: list[str] = []
    s = Services(a=_Svc(log, "a"), b=_Svc(log, "b", fail_start=True), c=_Svc(log, "c"))
    with pytest.raises(RuntimeError):
        asyncio.run(s.start_all())
    assert log == ["start a", "stop a"]
