"""Profile handlers: which scheduling profiles run for a request, and how their results combine.

- ``single-profile-handler``: the one configured profile; its result is primary (llm-d-router
  pkg/epp/framework/plugins/scheduling/profilehandler/single). Used implicitly when a config has exactly one
  profile and names no handler. Several profiles with this handler fail at start-up (the reference accepts the
  config and fails every request).
- ``header-profile-handler``: runs the one profile named by a request header (``headerName``, default
  ``EPP-Profile``, case-insensitive); a missing or blank header runs ``defaultProfile`` (default ``decode``); with
  one profile configured that profile always runs (llm-d-router .../profilehandler/headerprofile). A header value
  naming no configured profile is a 400 ``unknown_scheduling_profile`` here (the reference answers 429 and says so
  is wrong in its README); a ``defaultProfile`` that is not configured fails at start-up (the reference finds out
  per request).

The P/D handler (``disagg-profile-handler``) lives in its own module and implements the same protocol
(:class:`extproc.plugin.ProfileHandler`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from extproc.plugin import (
    CycleState,
    InferenceRequest,
    PluginContext,
    ProfileResults,
    SchedulingError,
    SchedulingProfile,
    SchedulingResult,
    check_keys,
    get_int,
    register,
)


def _single_result(results: ProfileResults) -> SchedulingResult:
    name = next(iter(results))
    r = results[name]
    return SchedulingResult({name: r} if r is not None else {}, name)


@register
class SingleProfileHandler:
    type_name: ClassVar[str] = "single-profile-handler"
    owned_headers: ClassVar[tuple[str, ...]] = ()
    __slots__ = ("name", "profile")

    def __init__(self, name: str = "single-profile-handler", profile: str | None = None) -> None:
        self.name = name
        self.profile = profile

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "SingleProfileHandler":
        check_keys(params, ())
        return cls(name)

    def configure(self, profiles: dict[str, SchedulingProfile]) -> None:
        if self.profile is None:
            if len(profiles) != 1:
                raise ValueError(
                    f"single-profile-handler runs exactly one profile, but {len(profiles)} are configured "
                    f"({', '.join(profiles)}); use header-profile-handler or disagg-profile-handler"
                )
            self.profile = next(iter(profiles))
        elif self.profile not in profiles:
            raise ValueError(f"profile '{self.profile}' is not configured")

    def pick_profiles(
        self, cycle: CycleState, request: InferenceRequest, profiles: dict[str, SchedulingProfile], results: ProfileResults
    ) -> list[SchedulingProfile]:
        if results:
            return []
        return [profiles[self.profile] if self.profile is not None else next(iter(profiles.values()))]

    def process_results(self, cycle: CycleState, request: InferenceRequest, results: ProfileResults) -> SchedulingResult:
        return _single_result(results)


@register
class HeaderProfileHandler:
    type_name: ClassVar[str] = "header-profile-handler"
    owned_headers: ClassVar[tuple[str, ...]] = ()
    __slots__ = ("name", "header_name", "default_profile", "_only")

    def __init__(self, name: str = "header-profile-handler", header_name: str = "EPP-Profile", default_profile: str = "decode") -> None:
        self.name = name
        self.header_name = header_name.strip().lower() or "epp-profile"
        self.default_profile = default_profile.strip() or "decode"
        self._only: str | None = None

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "HeaderProfileHandler":
        check_keys(params, ("headerName", "defaultProfile"))
        header = params.get("headerName") or "EPP-Profile"
        default = params.get("defaultProfile") or "decode"
        if not isinstance(header, str) or not isinstance(default, str):
            raise TypeError("parameters 'headerName' and 'defaultProfile' must be strings")
        return cls(name, header, default)

    def configure(self, profiles: dict[str, SchedulingProfile]) -> None:
        if len(profiles) == 1:
            self._only = next(iter(profiles))
        elif self.default_profile not in profiles:
            raise ValueError(f"defaultProfile '{self.default_profile}' is not a configured profile ({', '.join(profiles)})")

    def pick_profiles(
        self, cycle: CycleState, request: InferenceRequest, profiles: dict[str, SchedulingProfile], results: ProfileResults
    ) -> list[SchedulingProfile]:
        if results:
            return []
        if len(profiles) == 1:
            return [next(iter(profiles.values()))]
        wanted = (request.headers.get(self.header_name) or "").strip()
        name = wanted or self.default_profile
        profile = profiles.get(name)
        if profile is None:
            raise SchedulingError(
                400,
                f"header '{self.header_name}' names scheduling profile '{wanted}', which is not configured "
                f"(configured: {', '.join(sorted(profiles))})",
                "unknown_scheduling_profile",
            )
        return [profile]

    def process_results(self, cycle: CycleState, request: InferenceRequest, results: ProfileResults) -> SchedulingResult:
        return _single_result(results)


@register
class DataParallelProfileHandler(SingleProfileHandler):
    """``data-parallel-profile-handler`` (deprecated in the reference, accepted): one profile. The reference routes
    to ``podIP:primaryPort`` and names the chosen rank in ``X-Data-Parallel-Endpoint``; its documented migration is
    ``single-profile-handler`` with a proxy that routes to the rank's own port, which is what Envoy does here with
    ``x-gateway-destination-endpoint`` (each rank is its own endpoint). ``primaryPort`` (1–65535, default 8000) is
    validated and otherwise unused."""

    type_name: ClassVar[str] = "data-parallel-profile-handler"
    __slots__ = ("primary_port",)

    def __init__(self, name: str = "data-parallel-profile-handler", primary_port: int = 8000) -> None:
        super().__init__(name)
        self.primary_port = primary_port

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "DataParallelProfileHandler":
        check_keys(params, ("primaryPort",))
        port = get_int(params, "primaryPort", 8000, minimum=1)
        if port > 65535:
            raise ValueError(f"parameter 'primaryPort' must be in 1..65535, got {port}")
        return cls(name, port)
