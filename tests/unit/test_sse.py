"""The one SSE reader: data payloads in order, lines split anywhere across network chunks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from extproc.sse import DONE, data_payloads


async def _chunks(parts: Sequence[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def _payloads(parts: Sequence[bytes]) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [p async for p in data_payloads(_chunks(parts))]

    return asyncio.run(collect())


STREAM = (
    b'data: {"choices":[{"text":"h\xc3\xa9llo"}]}\n\n'
    b": keep-alive comment\n\n"
    b"event: message\nid: 7\n"
    b'data:{"choices":[],"usage":{"completion_tokens":2}}\r\n\r\n'
    b"data: [DONE]\n\n"
)


def test_payloads_in_order_other_lines_dropped() -> None:
    assert _payloads([STREAM]) == [
        b'{"choices":[{"text":"h\xc3\xa9llo"}]}',
        b'{"choices":[],"usage":{"completion_tokens":2}}',
        DONE,
    ]


def test_any_split_gives_the_same_payloads() -> None:
    whole = _payloads([STREAM])
    for cut in range(1, len(STREAM)):
        assert _payloads([STREAM[:cut], STREAM[cut:]]) == whole, cut
    assert _payloads([STREAM[i : i + 1] for i in range(len(STREAM))]) == whole


def test_incomplete_last_line_is_dropped() -> None:
    assert _payloads([b'data: {"a":1}\n\ndata: [DO']) == [b'{"a":1}']
    assert _payloads([b"data: [DONE]"]) == []
