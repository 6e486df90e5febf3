"""``session-affinity-scorer``: keep a session on the pod that served it last.

A request carrying the session header (default ``x-session-token``) scores 1.0 on the pod that last served that
session and 0.0 elsewhere; requests without the header, or with an unknown token, score 0.0 everywhere (so the
other scorers decide). The plugin is also a pre-request hook: when a request is dispatched, the token is mapped
to the primary pod. The map is an LRU bounded by ``maxSessions``.

llm-d's scorer of the same name (llm-d-inference-scheduler pkg/plugins/scorer/session_affinity.go) round-trips
the pod name through a cookie instead; keeping the map here means clients only need a stable opaque token.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    SchedulingResult,
    check_keys,
    get_int,
    get_str,
    register,
)

log = logging.getLogger(__name__)

DEFAULT_HEADER = "x-session-token"
DEFAULT_MAX_SESSIONS = 100_000


@register
class SessionAffinityScorer:
    type_name: ClassVar[str] = "session-affinity-scorer"
    __slots__ = ("name", "header", "max_sessions", "_sessions")

    def __init__(
        self, name: str = "session-affinity-scorer", header: str = DEFAULT_HEADER, max_sessions: int = DEFAULT_MAX_SESSIONS
    ) -> None:
        if max_sessions <= 0:
            raise ValueError(f"parameter 'maxSessions' must be > 0, got {max_sessions}")
        self.name = name
        self.header = header.lower()
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, str] = OrderedDict()  # token → endpoint address

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "SessionAffinityScorer":
        check_keys(params, ("headerName", "maxSessions"))
        return cls(
            name,
            get_str(params, "headerName", DEFAULT_HEADER),
            get_int(params, "maxSessions", DEFAULT_MAX_SESSIONS, minimum=1),
        )

    def __len__(self) -> int:
        return len(self._sessions)

    def target_of(self, token: str) -> str | None:
        return self._sessions.get(token)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        token = request.headers.get(self.header)
        target = self._sessions.get(token) if token else None
        if target is None:
            return [0.0] * len(candidates)
        return [1.0 if e.address == target else 0.0 for e in candidates]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        token = request.headers.get(self.header)
        if not token:
            return
        sessions = self._sessions
        sessions[token] = result.primary.address
        sessions.move_to_end(token)
        if len(sessions) > self.max_sessions:
            sessions.popitem(last=False)
