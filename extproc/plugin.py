"""The plugin author's API: everything a scheduling plugin needs, from one module.

A plugin is a plain class with a ``type_name`` (its registry name, the ``type:`` of a config entry) and a
``name`` (the instance name). What it *does* is decided by the protocols it satisfies, checked with
``isinstance`` against the runtime-checkable protocols below when a config is loaded (:func:`roles_of`):

- :class:`Filter` — ``filter(cycle, request, candidates) -> candidates``
- :class:`Scorer` — ``score(cycle, request, candidates) -> [0..1 per candidate]`` (weighted in the profile)
- :class:`Picker` — ``pick(cycle, request, scored) -> [target, fallbacks...]``
- :class:`PreRequest` — ``pre_request(cycle, request, result)`` once the request is dispatched
- :class:`ResponseObserver` — ``on_complete(request, observation)`` when it finishes
- :class:`ProfileHandler` — chooses the profiles of a cycle and combines their results
- :class:`Admitter` — ``admit(cycle, request, candidates)`` before any profile runs; raises to reject (429)
- :class:`FairnessPolicy` — ``pick_tenant(queues, now)``: which fairness key of a flow-control band goes next
- :class:`UsageLimitPolicy` — ``compute_limits(saturation, bands)``: per-band dispatch ceilings of flow control
- :class:`ResponseReporter` — ``report(request, usage)``: dynamic metadata for the proxy when a response ends
- :class:`Decider` — a per-request yes/no for an optional stage of a profile handler (``deciders.prefill``)
- :class:`Service` — a shared background service (``async start()`` / ``async stop()``), put in ``ctx.services``
  (a :class:`Services` registry, typed keys :class:`ServiceKey`); the server starts and stops every one

A plugin may also declare its roles explicitly with ``plugin_roles: ClassVar[frozenset[str]]`` (names from
:data:`ROLES`); the declaration must agree with the protocols it satisfies.

Build a plugin with ``@register`` on the class: the loader calls ``cls.from_config(name, params, ctx)`` if the
class defines it, else ``cls(name=name, **params)``. Read parameters with the strict readers (``check_keys``,
``get_int``, ...): unknown keys and wrong types are errors, which the loader reports with the file and plugin.
Per-request scratch data lives in :class:`CycleState` under typed :class:`CycleKey` constants; the shared ones
are below (``PREFIX_SCORES``, ``PREFIX_CACHED_TOKENS``, ...). Third-party packages expose plugins through the
``extproc.plugins`` entry-point group (see docs/plugins.md for a complete example).
"""

from __future__ import annotations

from typing import Any

from extproc.api import InferenceRequest
from extproc.datalayer.endpoint import Endpoint, EndpointPool, PodMetrics
from extproc.scheduling.framework import (
    PD_STAGE,
    PD_STAGE_DECODE,
    PD_STAGE_ENCODE,
    PD_STAGE_PREFILL,
    PEER_ENDPOINT,
    PREDICTOR_PREFILL_FEATURES,
    Admitter,
    FairnessPolicy,
    UsageLimitPolicy,
    ResponseReporter,
    PREDICTOR_FEATURES,
    PREFIX_BLOCK_SIZE,
    PREFIX_CACHED_TOKENS,
    PREFIX_MATCHED_BLOCKS,
    PREFIX_SCORES,
    PREFIX_TOTAL_BLOCKS,
    PROMPT_TOKEN_IDS,
    CycleKey,
    CycleState,
    Decider,
    Filter,
    Observation,
    Picker,
    Plugin,
    PreRequest,
    ProfileHandler,
    ProfileResult,
    ProfileResults,
    ResponseObserver,
    SchedulingError,
    SchedulingProfile,
    SchedulingResult,
    ScoredEndpoint,
    Scorer,
)
from extproc.scheduling.normalize import fixed_range_lower_is_better, min_max_higher_is_better, min_max_lower_is_better
from extproc.scheduling.params import (
    check_keys,
    get_bool,
    get_choice,
    get_duration,
    get_float,
    get_int,
    get_mapping,
    get_seed,
    get_str,
    get_str_list,
    parse_duration,
)
from extproc.scheduling.registry import PluginContext, register
from extproc.services import Service, ServiceKey, Services


# role name → protocol; the order is the order roles are placed in a profile (filter before scorer before picker)
ROLES: dict[str, type] = {
    "filter": Filter,
    "scorer": Scorer,
    "picker": Picker,
    "pre_request": PreRequest,
    "observer": ResponseObserver,
    "profile_handler": ProfileHandler,
    "decider": Decider,
    "admitter": Admitter,
    "fairness_policy": FairnessPolicy,
    "usage_limit_policy": UsageLimitPolicy,
    "response_reporter": ResponseReporter,
}
PROFILE_ROLES = ("filter", "scorer", "picker")  # roles that can be placed in a scheduling profile


def roles_of(plugin: Any) -> frozenset[str]:
    """The roles a plugin instance plays, by protocol (``isinstance``), checked against ``plugin_roles`` when the
    class declares them. Raises ``TypeError`` when a declared role's methods are missing."""
    found = frozenset(role for role, proto in ROLES.items() if isinstance(plugin, proto))
    declared = getattr(type(plugin), "plugin_roles", None)
    if declared is None:
        return found
    declared = frozenset(declared)
    unknown = declared - ROLES.keys()
    if unknown:
        raise TypeError(f"plugin_roles names unknown role(s) {sorted(unknown)} (known: {', '.join(ROLES)})")
    missing = declared - found
    if missing:
        raise TypeError(f"declares role(s) {sorted(missing)} but does not implement their methods")
    return declared


__all__ = [
    # protocols
    "Plugin",
    "Filter",
    "Scorer",
    "Picker",
    "PreRequest",
    "ResponseObserver",
    "ProfileHandler",
    "Decider",
    "Admitter",
    "FairnessPolicy",
    "UsageLimitPolicy",
    "ResponseReporter",
    "Service",
    "ServiceKey",
    "Services",
    "ROLES",
    "PROFILE_ROLES",
    "roles_of",
    # data the plugins see
    "CycleKey",
    "CycleState",
    "Endpoint",
    "EndpointPool",
    "PodMetrics",
    "InferenceRequest",
    "Observation",
    "ScoredEndpoint",
    "ProfileResult",
    "ProfileResults",
    "SchedulingProfile",
    "SchedulingResult",
    "SchedulingError",
    # registration
    "PluginContext",
    "register",
    # parameter readers
    "check_keys",
    "get_bool",
    "get_choice",
    "get_duration",
    "get_float",
    "get_int",
    "get_mapping",
    "get_seed",
    "get_str",
    "get_str_list",
    "parse_duration",
    # normalisers
    "min_max_lower_is_better",
    "min_max_higher_is_better",
    "fixed_range_lower_is_better",
    # shared cycle-state keys
    "PREFIX_SCORES",
    "PREFIX_MATCHED_BLOCKS",
    "PREFIX_TOTAL_BLOCKS",
    "PREFIX_BLOCK_SIZE",
    "PREFIX_CACHED_TOKENS",
    "PROMPT_TOKEN_IDS",
    "PREDICTOR_FEATURES",
    "PEER_ENDPOINT",
    "PD_STAGE",
    "PD_STAGE_DECODE",
    "PD_STAGE_PREFILL",
    "PD_STAGE_ENCODE",
    "PREDICTOR_PREFILL_FEATURES",
]
