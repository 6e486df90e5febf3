"""YAML configuration with the top-level shape of GIE's EndpointPickerConfig.

```yaml
plugins:
  - type: queue-scorer            # registry type
    name: queue                   # optional instance name (defaults to the type)
    parameters: {}
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue
        weight: 2
```

Every profile gets the ``healthy-filter`` and ``model-filter`` in front unless it lists them itself (a profile
can never route to a dead pod or one that does not serve the model), and the ``max-score-picker`` if it names
no picker. Errors are ``ConfigError`` with the file, the plugin and the reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from extproc.datalayer.endpoint import EndpointPool
from extproc.services import Services
from extproc.scheduling import llmd, registry
from extproc.plugin import roles_of
from extproc.scheduling.framework import (
    Filter,
    Picker,
    PreRequest,
    ProfileHandler,
    ResponseObserver,
    Scheduler,
    SchedulingProfile,
    Scorer,
    WeightedScorer,
)
from extproc.scheduling.plugins.profile_handlers import SingleProfileHandler

log = logging.getLogger(__name__)

IMPLICIT_FILTERS = ("healthy-filter", "model-filter")
DEFAULT_PICKER = "max-score-picker"


class ConfigError(Exception):
    def __init__(self, path: str, plugin: str | None, reason: str):
        self.path = path
        self.plugin = plugin
        self.reason = reason
        where = f"{path}" + (f": plugin '{plugin}'" if plugin else "")
        super().__init__(f"{where}: {reason}")


@dataclass(slots=True)
class SchedulerConfig:
    """The parsed config: the built scheduler plus the raw sections other subsystems read."""

    scheduler: Scheduler
    plugins: dict[str, Any]
    raw: dict[str, Any]
    path: str
    saturation: dict[str, Any] = field(default_factory=dict)
    flow_control: dict[str, Any] = field(default_factory=dict)
    objectives: dict[str, int] = field(default_factory=dict)  # x-gateway-inference-objective → priority
    origins: dict[str, "llmd.Origin"] = field(default_factory=dict)  # plugin name → reference type / what runs
    feature_gates: dict[str, bool] = field(default_factory=dict)
    fairness: dict[Any, Any] = field(default_factory=dict)  # flow-control band priority (or "default") → FairnessPolicy
    usage_limit: Any = None  # flow-control UsageLimitPolicy (flowControl.usageLimitPolicyPluginRef)
    band_priorities: list[int] = field(default_factory=list)  # configured flow-control bands


def builtin_config_path(name: str) -> str:
    """Path of a shipped profile: ``default``, ``prefix-load``, ``random``, ``predicted-latency``, ..."""
    p = resources.files("extproc") / "configs" / f"{name}.yaml"
    return str(p)


def resolve_config_path(name_or_path: str) -> str:
    if os.path.exists(name_or_path):
        return name_or_path
    p = builtin_config_path(name_or_path)
    if os.path.exists(p):
        return p
    raise ConfigError(name_or_path, None, "no such file and no built-in profile of that name")


def load_config(name_or_path: str, pool: EndpointPool, services: dict[str, Any] | None = None) -> SchedulerConfig:
    path = resolve_config_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(path, None, f"invalid YAML: {e}") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e}") from None
    return build_config(raw, pool, services, path)


def build_config(raw: Any, pool: EndpointPool, services: dict[str, Any] | None = None, path: str = "<inline>") -> SchedulerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(path, None, "top level must be a mapping with 'plugins' and 'schedulingProfiles'")
    original = raw
    try:
        raw, origins, gates = llmd.translate(raw)
    except llmd.TranslationError as e:
        raise ConfigError(path, e.plugin, e.reason) from None
    registry.load_builtin_plugins()
    registry.load_entry_points()
    # the caller's services dict is shared on purpose: plugins register shared services (prefix index, KV-event
    # manager, predictor) in it, and the server starts/stops them and exports their stats
    ctx = registry.PluginContext(pool=pool, services=services if services is not None else Services(), config_path=path)

    plugin_specs = raw.get("plugins") or []
    if not isinstance(plugin_specs, list):
        raise ConfigError(path, None, "'plugins' must be a list")
    plugins: dict[str, Any] = ctx.plugins  # one dict: a plugin may look up others by name (complete at configure time)
    for i, spec in enumerate(plugin_specs):
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(path, f"plugins[{i}]", "each plugin needs a 'type'")
        ptype = spec["type"]
        name = spec.get("name") or ptype
        if name in plugins:
            raise ConfigError(path, name, "duplicate plugin name")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(path, name, "'parameters' must be a mapping")
        plugins[name] = _instantiate(ptype, name, params, ctx)

    def implicit(ptype: str) -> Any:
        for p in plugins.values():
            if getattr(p, "type_name", None) == ptype:
                return p
        inst = _instantiate(ptype, ptype, {}, ctx)
        plugins[ptype] = inst
        return inst

    profile_specs = raw.get("schedulingProfiles")
    if not profile_specs:
        raise ConfigError(path, None, "'schedulingProfiles' must list at least one profile")
    if not isinstance(profile_specs, list):
        raise ConfigError(path, None, "'schedulingProfiles' must be a list")
    roles: dict[str, frozenset[str]] = {}
    for pname_, p in plugins.items():
        try:
            roles[pname_] = roles_of(p)
        except TypeError as e:
            raise ConfigError(path, pname_, str(e)) from None
    reference = llmd.is_reference_file(original)
    handlers = [n for n, r in roles.items() if "profile_handler" in r]
    if len(handlers) > 1:
        raise ConfigError(path, handlers[1], f"a config takes one profile handler, found {', '.join(handlers)}")
    handler: ProfileHandler | None = plugins[handlers[0]] if handlers else None
    profiles: dict[str, SchedulingProfile] = {}
    for spec in profile_specs:
        if not isinstance(spec, dict) or not spec.get("name"):
            raise ConfigError(path, None, "each scheduling profile needs a 'name'")
        pname = spec["name"]
        if pname in profiles:
            raise ConfigError(path, None, f"duplicate scheduling profile '{pname}'")
        filters: list[Filter] = []
        scorers: list[WeightedScorer] = []
        picker: Picker | None = None
        refs = spec.get("plugins") or []
        if not isinstance(refs, list):
            raise ConfigError(path, None, f"profile '{pname}': 'plugins' must be a list")
        for ref in refs:
            if not isinstance(ref, dict) or "pluginRef" not in ref:
                raise ConfigError(path, None, f"profile '{pname}': each entry needs a 'pluginRef'")
            pr = ref["pluginRef"]
            if pr not in plugins:
                raise ConfigError(path, pr, f"profile '{pname}' refers to an undefined plugin")
            plugin = plugins[pr]
            r = roles[pr]
            placed = False
            if "filter" in r:
                filters.append(plugin)
                placed = True
            if "scorer" in r:
                w = ref.get("weight", 1)
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                    raise ConfigError(path, pr, f"weight must be a number >= 0, got {w!r}")
                scorers.append(WeightedScorer(plugin, float(w)))
                placed = True
            if "picker" in r:
                if picker is not None:
                    raise ConfigError(path, pr, f"profile '{pname}' has two pickers ('{picker.name}' and '{pr}')")
                picker = plugin
                placed = True
            if not placed:
                if reference:  # llm-d-router's SchedulerProfile.AddPlugins ignores such plugins
                    log.info("plugin in a profile is not a filter, scorer or picker: ignored as the reference does",
                             extra={"profile": pname, "plugin": pr})
                    continue
                raise ConfigError(path, pr, "is not a filter, scorer or picker and cannot be placed in a profile")
        present = {getattr(f, "type_name", "") for f in filters}
        front = [implicit(t) for t in IMPLICIT_FILTERS if t not in present]
        filters = front + filters
        if picker is None:
            # the reference's loader adds the first picker the file defines, else max-score-picker
            any_picker = next((plugins[n] for n, r in roles.items() if "picker" in r), None) if reference else None
            picker = any_picker if any_picker is not None else implicit(DEFAULT_PICKER)
        profiles[pname] = SchedulingProfile(pname, filters, scorers, picker)

    if handler is None:
        if len(profiles) > 1:
            raise ConfigError(
                path, None, f"{len(profiles)} scheduling profiles need a profile handler plugin "
                "(header-profile-handler, disagg-profile-handler)"
            )
        handler = SingleProfileHandler(profile=next(iter(profiles)))
    try:
        handler.configure(profiles)
    except ValueError as e:
        raise ConfigError(path, handler.name, str(e)) from None
    pre = [p for n, p in plugins.items() if "pre_request" in roles.get(n, frozenset())]
    obs = [p for n, p in plugins.items() if "observer" in roles.get(n, frozenset())]
    adm = [p for n, p in plugins.items() if "admitter" in roles.get(n, frozenset())]
    rep = [p for n, p in plugins.items() if "response_reporter" in roles.get(n, frozenset())]
    sched = Scheduler(pool=pool, profiles=profiles, handler=handler, pre_request=pre, observers=obs, admitters=adm, reporters=rep)

    objectives: dict[str, int] = {}
    for o in raw.get("objectives") or []:
        if not isinstance(o, dict) or "name" not in o:
            raise ConfigError(path, None, "each entry of 'objectives' needs 'name' and 'priority'")
        pr_ = o.get("priority", 0)
        if isinstance(pr_, bool) or not isinstance(pr_, int):
            raise ConfigError(path, None, f"objective '{o['name']}': priority must be an integer")
        objectives[str(o["name"])] = pr_
    fairness: dict[Any, Any] = {}
    fc = raw.get("flowControl") or {}
    for where, ref in (fc.get("policyRefs") or {}).items():
        if not where.endswith("fairnessPolicyRef"):
            raise ConfigError(path, ref, f"flowControl.{where}: ordering policies are not configurable (bands are FIFO per fairness key)")
        p = plugins.get(ref)
        if p is None or "fairness_policy" not in roles.get(ref, frozenset()):
            raise ConfigError(path, ref, f"flowControl.{where} must name a fairness policy plugin (e.g. program-aware-fairness)")
        if where.startswith("defaultPriorityBand"):
            fairness["default"] = p
        elif where.startswith("priorityBands["):
            idx = int(where[len("priorityBands[") : where.index("]")])
            fairness[int(fc["bandPriorities"][idx])] = p
        # defaultNegativePriorityBand: sheddable requests are never queued here, so nothing to order
    usage_limit = None
    ul = fc.get("usageLimitPolicyPluginRef")
    if ul:
        usage_limit = plugins.get(ul)
        if usage_limit is None or "usage_limit_policy" not in roles.get(ul, frozenset()):
            raise ConfigError(path, ul, "flowControl.usageLimitPolicyPluginRef must name a usage-limit policy plugin (e.g. soft-reflective-ceiling-policy)")
    if (fairness or usage_limit is not None) and not fc.get("enabled"):
        log.warning("a fairness policy is configured but flow control is off (featureGates: [flowControl] enables it)")
    for n, p in plugins.items():
        if n not in origins:  # implicit plugins (healthy/model filters, default picker)
            origins[n] = llmd.Origin(n, "", getattr(p, "type_name", type(p).__name__), "added implicitly")
    return SchedulerConfig(
        scheduler=sched,
        plugins=plugins,
        raw=original,
        path=path,
        origins=origins,
        feature_gates=gates,
        fairness=fairness,
        usage_limit=usage_limit,
        band_priorities=list(fc.get("bandPriorities") or []),
        saturation=dict(raw.get("saturationDetector") or {}),
        flow_control=dict(raw.get("flowControl") or {}),
        objectives=objectives,
    )


def _instantiate(ptype: str, name: str, params: dict[str, Any], ctx: registry.PluginContext) -> Any:
    factory = registry.PLUGIN_TYPES.get(ptype)
    if factory is None:
        known = ", ".join(sorted(registry.PLUGIN_TYPES))
        raise ConfigError(ctx.config_path, name, f"unknown plugin type '{ptype}' (known: {known})")
    try:
        plugin = factory(name, dict(params), ctx)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(ctx.config_path, name, f"bad parameters for '{ptype}': {e}") from None
    if not getattr(plugin, "name", None):
        try:
            plugin.name = name
        except AttributeError:
            pass
    return plugin


__all__ = [
    "ConfigError",
    "SchedulerConfig",
    "build_config",
    "load_config",
    "builtin_config_path",
    "resolve_config_path",
    "PreRequest",
    "ResponseObserver",
    "Scorer",
]
