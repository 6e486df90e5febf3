"""The plugin registry: built-in plugins register by decorator; third-party plugins arrive through the
``extproc.plugins`` entry-point group (each entry point names a plugin class or a factory)."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from extproc.datalayer.endpoint import EndpointPool
from extproc.services import Services

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "extproc.plugins"


@dataclass(slots=True)
class PluginContext:
    """What a plugin may use when it is built: the endpoint pool, shared services by name (e.g. the prefix
    index, the KV-event index, the predictor), and the config file path for error messages."""

    pool: EndpointPool
    # the shared-service registry (extproc.services.Services from the server and the virtual bench; any dict works)
    services: dict[str, Any] = field(default_factory=Services)
    config_path: str = "<built-in>"
    # the config's plugins by instance name, filled as they are built; complete when a profile handler's
    # ``configure`` runs (the P/D handler resolves ``deciders.prefill`` there, whatever the plugin order)
    plugins: dict[str, Any] = field(default_factory=dict)


PluginFactory = Callable[[str, dict[str, Any], PluginContext], Any]

# The registry: plugin type name → factory(name, parameters, context). Module-level by design (the one
# well-named registry); only ``register`` and ``load_entry_points`` write to it.
PLUGIN_TYPES: dict[str, PluginFactory] = {}
_entry_points_loaded = False


def _factory_of(obj: Any) -> PluginFactory:
    if isinstance(obj, type):
        from_config = getattr(obj, "from_config", None)
        if from_config is not None:
            return from_config  # type: ignore[no-any-return]
        return lambda name, params, ctx: obj(name=name, **params)
    if callable(obj):
        return obj  # type: ignore[no-any-return]
    raise TypeError(f"{obj!r} is neither a plugin class nor a factory")


def register(cls: type) -> type:
    """Class decorator: register a plugin class under its ``type_name``.

    A class gets built with ``cls.from_config(name, params, ctx)`` if it defines it, else ``cls(name=name, **params)``.
    """
    type_name = getattr(cls, "type_name", None)
    if not isinstance(type_name, str) or not type_name:
        raise TypeError(f"{cls.__name__} needs a class attribute type_name")
    PLUGIN_TYPES[type_name] = _factory_of(cls)
    return cls


def load_builtin_plugins() -> None:
    import extproc.scheduling.plugins  # noqa: F401  (importing registers the built-ins)


def load_entry_points(force: bool = False) -> dict[str, str]:
    """Load third-party plugins from the ``extproc.plugins`` group. Returns {type: 'module:attr'} loaded.

    The entry-point name is the plugin type; if the loaded class has its own ``type_name`` it is also registered
    under that name.
    """
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return {}
    _entry_points_loaded = True
    loaded: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken third-party package must not take the scheduler down silently
            log.error("plugin entry point failed to load", extra={"entry_point": ep.name, "value": ep.value, "error": str(e)})
            continue
        factory = _factory_of(obj)
        PLUGIN_TYPES[ep.name] = factory
        tn = getattr(obj, "type_name", None)
        if isinstance(tn, str) and tn and tn not in PLUGIN_TYPES:
            PLUGIN_TYPES[tn] = factory
        loaded[ep.name] = ep.value
    return loaded


def available_types() -> list[str]:
    load_builtin_plugins()
    load_entry_points()
    return sorted(PLUGIN_TYPES)
