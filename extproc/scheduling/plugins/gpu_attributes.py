"""GPU data sources and the endpoint-attribute filter/scorer.

Reference: llm-d-router pkg/epp/framework/plugins/{datalayer/source/dcgm, datalayer/extractor/dcgm,
scheduling/filter/endpointattribute, scheduling/scorer/endpointattribute}.

- ``dcgm-data-source`` / ``dcgm-extractor``: the reference polls NVIDIA's DCGM exporter (``port`` 9400,
  ``path`` /metrics) for GPU utilisation. extproc has no DCGM scraper, so both are **accepted and reported
  inactive**: their parameters are validated, a warning says so at start-up and in ``extproc config check``, and
  the attributes they would produce (``GPUUtilization``, ...) stay absent on every endpoint. Nothing is invented.
- ``endpoint-attribute-filter``: keeps endpoints whose numeric ``attribute`` satisfies ``algorithm.threshold``
  (``operator`` LessThan | LessThanOrEqual | GreaterThan | GreaterThanOrEqual | Equal | NotEqual, ``value``);
  ``onMissing`` Pass (default, keep) | Fail (drop); ``fallbackOnEmpty``.
- ``endpoint-attribute-scorer``: linear score of ``attributeKey`` (``linear_lower_is_better`` |
  ``linear_higher_is_better``), range adaptive over candidates (default) or ``fixedRange`` {min, max}
  (clamped); an endpoint missing the attribute scores 0.

Attributes: with ``producer`` unset (the core metrics extractor) the names our scraper extracts —
``num_requests_waiting``/``WaitingQueueSize``, ``num_requests_running``/``RunningRequestsSize``,
``kv_cache_usage_perc``/``KVCacheUsagePercent`` — else a ``ConfigError``; with a DCGM producer the attribute is
absent (inactive source).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from extproc.plugin import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    check_keys,
    get_bool,
    get_choice,
    get_duration,
    get_float,
    get_int,
    get_mapping,
    get_str,
    register,
)

log = logging.getLogger(__name__)

CORE_ATTRIBUTES: dict[str, Callable[[Endpoint], float | None]] = {}
for _n in ("num_requests_waiting", "WaitingQueueSize"):
    CORE_ATTRIBUTES[_n] = lambda e: float(e.metrics.waiting) if e.metrics.updated_at else None
for _n in ("num_requests_running", "RunningRequestsSize"):
    CORE_ATTRIBUTES[_n] = lambda e: float(e.metrics.running) if e.metrics.updated_at else None
for _n in ("kv_cache_usage_perc", "KVCacheUsagePercent"):
    CORE_ATTRIBUTES[_n] = lambda e: e.metrics.kv_usage if e.metrics.updated_at else None
INACTIVE_PRODUCERS = ("dcgm-extractor",)


def _absent(e: Endpoint) -> float | None:
    return None


@register
class DCGMDataSource:
    type_name: ClassVar[str] = "dcgm-data-source"
    __slots__ = ("name", "active", "inactive_reason")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = False
        self.inactive_reason = "extproc has no DCGM exporter scraper; GPU attributes stay absent"

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "DCGMDataSource":
        check_keys(params, ("scheme", "path", "port", "insecureSkipVerify", "useNodeAddress", "interval"))
        get_choice(params, "scheme", "http", ("http", "https"))
        get_str(params, "path", "/metrics")
        port = get_int(params, "port", 9400, minimum=1)
        if port > 65535:
            raise ValueError(f"parameter 'port' must be in 1..65535, got {port}")
        get_bool(params, "insecureSkipVerify", True)
        get_bool(params, "useNodeAddress", False)
        get_duration(params, "interval", 0.05)
        inst = cls(name)
        log.warning("data source accepted but INACTIVE", extra={"plugin": name, "type": cls.type_name, "reason": inst.inactive_reason})
        return inst


@register
class DCGMExtractor:
    type_name: ClassVar[str] = "dcgm-extractor"
    __slots__ = ("name", "active", "inactive_reason")

    def __init__(self, name: str) -> None:
        self.name = name
        self.active = False
        self.inactive_reason = "its source (dcgm-data-source) is inactive; GPUUtilization and other DCGM attributes stay absent"

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "DCGMExtractor":
        check_keys(params, ())
        inst = cls(name)
        log.warning("extractor accepted but INACTIVE", extra={"plugin": name, "type": cls.type_name, "reason": inst.inactive_reason})
        return inst


def _reader(attribute: str, producer: str | None) -> Callable[[Endpoint], float | None]:
    if producer in INACTIVE_PRODUCERS or (producer and producer.startswith("dcgm")):
        return _absent
    if producer:
        raise ValueError(f"producer '{producer}' is not a data source extproc has (known: core metrics extractor, dcgm-extractor)")
    r = CORE_ATTRIBUTES.get(attribute)
    if r is None:
        raise ValueError(f"attribute '{attribute}' is not extracted by extproc's metrics scraper (extracted: {', '.join(sorted(CORE_ATTRIBUTES))})")
    return r


_OPS: dict[str, Callable[[float, float], bool]] = {
    "LessThan": operator.lt,
    "LessThanOrEqual": operator.le,
    "GreaterThan": operator.gt,
    "GreaterThanOrEqual": operator.ge,
    "Equal": operator.eq,
    "NotEqual": operator.ne,
}


@register
class EndpointAttributeFilter:
    type_name: ClassVar[str] = "endpoint-attribute-filter"
    __slots__ = ("name", "read", "op", "value", "keep_missing", "fallback")

    def __init__(self, name: str, read: Callable[[Endpoint], float | None], op: str, value: float, keep_missing: bool, fallback: bool) -> None:
        self.name = name
        self.read = read
        self.op = _OPS[op]
        self.value = value
        self.keep_missing = keep_missing
        self.fallback = fallback

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "EndpointAttributeFilter":
        check_keys(params, ("attribute", "producer", "onMissing", "fallbackOnEmpty", "algorithm"))
        attr = get_str(params, "attribute", "")
        producer = params.get("producer")
        if producer is not None and not isinstance(producer, str):
            raise TypeError("parameter 'producer' must be a string")
        algo = get_mapping(params, "algorithm")
        check_keys(algo, ("type", "threshold"))
        get_choice(algo, "type", "", ("threshold",))
        th = get_mapping(algo, "threshold")
        check_keys(th, ("operator", "value"))
        op = get_choice(th, "operator", "", tuple(_OPS))
        if "value" not in th:
            raise ValueError("algorithm.threshold.value is required")
        return cls(
            name,
            _reader(attr, producer or None),
            op,
            get_float(th, "value", 0.0),
            get_choice(params, "onMissing", "Pass", ("Pass", "Fail")) == "Pass",
            get_bool(params, "fallbackOnEmpty", False),
        )

    def filter(self, cycle: CycleState, request: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        kept = []
        for e in candidates:
            v = self.read(e)
            if (v is None and self.keep_missing) or (v is not None and self.op(v, self.value)):
                kept.append(e)
        if not kept and self.fallback:
            return candidates
        return kept


@register
class EndpointAttributeScorer:
    type_name: ClassVar[str] = "endpoint-attribute-scorer"
    __slots__ = ("name", "read", "lower_is_better", "fixed")

    def __init__(self, name: str, read: Callable[[Endpoint], float | None], lower_is_better: bool, fixed: tuple[float, float] | None) -> None:
        self.name = name
        self.read = read
        self.lower_is_better = lower_is_better
        self.fixed = fixed

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "EndpointAttributeScorer":
        check_keys(params, ("attributeKey", "producer", "algorithm"))
        attr = get_str(params, "attributeKey", "")
        producer = params.get("producer")
        if producer is not None and not isinstance(producer, str):
            raise TypeError("parameter 'producer' must be a string")
        algo = get_mapping(params, "algorithm")
        check_keys(algo, ("type", "normalization"))
        t = get_choice(algo, "type", "", ("linear_lower_is_better", "linear_higher_is_better"))
        norm = get_mapping(algo, "normalization")
        check_keys(norm, ("adaptiveRange", "fixedRange"))
        if len(norm) > 1:
            raise ValueError("algorithm.normalization takes at most one strategy")
        fixed = None
        if "fixedRange" in norm:
            fr = get_mapping(norm, "fixedRange")
            check_keys(fr, ("min", "max"))
            lo, hi = get_float(fr, "min", 0.0), get_float(fr, "max", 1.0)
            if lo >= hi:
                raise ValueError("fixedRange.min must be less than fixedRange.max")
            fixed = (lo, hi)
        return cls(name, _reader(attr, producer or None), t == "linear_lower_is_better", fixed)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        vals = [self.read(e) for e in candidates]
        present = [v for v in vals if v is not None]
        if not present:
            return [0.0] * len(candidates)
        if self.fixed is not None:
            lo, hi = self.fixed
        else:
            lo, hi = min(present), max(present)
        span = hi - lo
        out = []
        for v in vals:
            if v is None:
                out.append(0.0)
                continue
            x = 1.0 if span <= 0 else min(1.0, max(0.0, (v - lo) / span))
            out.append(1.0 - x if self.lower_is_better and span > 0 else x)
        return out
