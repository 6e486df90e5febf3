"""Built-in plugins, one per module. Importing this package registers them all."""

from importlib import import_module

# Each module registers its plugin classes with extproc.scheduling.registry.register. A missing or broken
# built-in module is a hard error.
_BUILTIN_MODULES = (
    "filters",
    "profile_handlers",
    "role_filters",
    "pd_deciders",
    "prefill_backlog",
    "disagg",
    "no_hit_lru",
    "utilization_filter",
    "prefix_affinity_filter",
    "probabilistic_admitter",
    "topology",
    "gpu_attributes",
    "multimodal_decider",
    "program_aware",
    "fairness_policies",
    "soft_reflective_ceiling",
    "mm_cache",
    "burst_prefix",
    "request_attribute_reporter",
    "queue",
    "kvcache",
    "running",
    "prefix",
    "lora",
    "pickers",
    "load_aware",
    "active_request",
    "token_load",
    "session_affinity",
    "inflight_limit",
    "batch_reserve",
    "batch_free",
    "precise_prefix",
    "latency",
    "slo",
)

for _m in _BUILTIN_MODULES:
    import_module(f"{__name__}.{_m}")
