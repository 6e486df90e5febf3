"""Built-in plugins, one per module. Importing this package registers them all."""

from importlib import import_module

# Each module registers its plugin classes with extproc.scheduling.registry.register.
_BUILTIN_MODULES = (
    "filters",
    "queue",
    "kvcache",
    "running",
    "prefix",
    "lora",
    "pickers",
)

for _m in _BUILTIN_MODULES:
    try:
        import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while a module is being written
        if e.name != f"{__name__}.{_m}":
            raise
