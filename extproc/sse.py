"""Client side of OpenAI-style server-sent events: the one SSE reader of the project.

The benchmark client (``extproc.bench.client``), the simulator calibration (``extproc.sim.calibrate``) and the
real-vLLM tests read streamed completions through :func:`data_payloads`. A stream is lines separated by ``\\n``
(``\\r\\n`` tolerated); each ``data:`` line carries one JSON chunk or the terminator ``[DONE]``; other lines
(blank separators, ``: comment``, ``event:``, ``id:``) carry nothing here. Network chunks may split a line
anywhere (even inside a multi-byte character): lines are cut only at ``\\n``. A last line without its newline
is an incomplete event and is dropped, as an SSE client does at end of stream.

The scheduler's own response tracking (``extproc.server.tracker``) does not parse events on the hot path; it
counts them on the bytes it forwards, so it does not use this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

__all__ = ["DONE", "data_payloads"]

DONE = b"[DONE]"  # the payload of the last event of an OpenAI stream


async def data_payloads(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Each ``data:`` payload of the stream in order, stripped of surrounding whitespace (``[DONE]`` included).

    ``chunks`` is any async iterable of bytes, e.g. ``resp.content.iter_any()`` of an aiohttp response.
    """
    buf = bytearray()
    async for data in chunks:
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl]).strip()
            start = nl + 1
            if line.startswith(b"data:"):
                yield line[5:].strip()
        del buf[:start]
