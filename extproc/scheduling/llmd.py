"""Reading llm-d's ``EndpointPickerConfig`` unchanged: the reference's file shape translated to ours, with a record
of where every plugin came from.

The reference (llm-d/llm-d-router ``apix/config/v1alpha1/endpointpickerconfig_types.go``, loader in
``pkg/epp/config/loader``) accepts ``apiVersion`` ``llm-d.ai/v1alpha1`` or the older
``inference.networking.x-k8s.io/v1alpha1``, ``kind: EndpointPickerConfig`` and the top-level sections
``plugins``, ``schedulingProfiles``, ``featureGates``, ``dataLayer``, ``flowControl``, ``requestHandler``,
``saturationDetector`` and ``parser``; unknown fields are errors there (strict decoding) and here.

:func:`translate` turns such a file into the shape :func:`extproc.scheduling.config.build_config` builds, and
returns one :class:`Origin` per plugin instance:

- a reference type we implement under the same name (``decode-filter``, ``no-hit-lru-scorer``, ...) passes through;
- the prefix pipeline (``token-producer`` → ``approx-`` / ``precise-prefix-cache-producer`` →
  ``prefix-cache-scorer`` with ``prefixMatchInfoProducerName``) becomes one of our scorers (``prefix-cache-scorer``
  or ``precise-prefix-cache``) with the producer's parameters translated (tokens → our units);
- a type describing something our design always does (``metrics-data-source``, ``core-metrics-extractor``,
  ``openai-parser``, ...) is *absorbed*: accepted, dropped from the chain, and logged once at load with what it maps
  to; references to it from ``dataLayer``, ``requestHandler`` or a profile are checked and then dropped;
- a type we cannot honour raises :class:`ConfigError` naming the file, the plugin and the reason.

Reference types and what they become are listed in :data:`ABSORBED` and docs/plugins.md ("llm-d drop-in").
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.api import CHARS_PER_TOKEN

log = logging.getLogger(__name__)

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
KIND = "EndpointPickerConfig"
TOP_LEVEL = (
    "apiVersion",
    "kind",
    "plugins",
    "schedulingProfiles",
    "featureGates",
    "dataLayer",
    "flowControl",
    "requestHandler",
    "saturationDetector",
    "parser",
    "objectives",  # ours: x-gateway-inference-objective → priority
)
# reference feature gates (cmd/epp/runner/runner.go RegisterFeatureGate) → what they mean here
FEATURE_GATES = {
    "flowControl": "enables flow control (queueing by priority band and fairness key)",
    "haPopulateNonLeaderDatastore": "no effect: one scheduler process holds its own datastore (no leader election)",
}


class TranslationError(Exception):
    """A reason the file cannot be honoured; ``config.py`` turns it into a ConfigError with the path."""

    def __init__(self, plugin: str | None, reason: str) -> None:
        super().__init__(reason)
        self.plugin = plugin
        self.reason = reason


@dataclass(slots=True)
class Origin:
    """Where one configured plugin instance came from, for ``extproc config check`` and the start-up log."""

    name: str
    reference_type: str  # the type written in the file
    extproc_type: str  # the type that runs ('' when absorbed into something else)
    note: str = ""  # what an absorbed / translated plugin maps to
    parameters: dict[str, Any] = field(default_factory=dict)  # as written in the file


# Reference types whose job our design always does: accepted, dropped from the chain, logged with this text.
ABSORBED: dict[str, str] = {
    "metrics-data-source": "the metrics scraper extproc always runs (GET /metrics of every pod, --scrape-interval)",
    "core-metrics-extractor": "the vLLM metric parser of the scraper (waiting, running, KV usage, LoRA, cache config)",
    "mock-metrics-source": "the metrics scraper (the reference's test double of a metrics source)",
    "endpoint-notification-source": "endpoint discovery (Kubernetes watch or --endpoints/--endpoints-file) and "
    "the KV-event subscriptions of the precise prefix index",
    "model-server-protocol-source": "the scraper's /v1/models discovery",
    "models-data-source": "the scraper's /v1/models discovery",
    "models-extractor": "the scraper's /v1/models discovery",
    "openai-parser": "extproc's OpenAI request parser (always on: completions, chat, responses, embeddings)",
    "passthrough-parser": "extproc's OpenAI request parser: extproc always parses the body (a body that is not "
    "OpenAI JSON is a 400 here, the reference forwards it unparsed)",
    "vllm-http-parser": "extproc's OpenAI request parser (vLLM's HTTP API is the OpenAI API)",
    "vllmhttp-parser": "extproc's OpenAI request parser (vLLM's HTTP API is the OpenAI API)",
    "k8s-notification-source": "extproc's Kubernetes discovery (pod watch)",
    "file-discovery": "static endpoints: extproc serve --endpoints / --endpoints-file",
    "models-data-extractor": "the scraper's /v1/models discovery",
    "disagg-headers-handler": "the P/D profile handler, which sets x-prefiller-host-port itself (deprecated there too)",
    "prefill-header-handler": "the P/D profile handler, which sets x-prefiller-host-port itself (deprecated there too)",
    "fcfs-ordering-policy": "extproc's flow-control order within a fairness key (first come, first served)",
    "token-producer": "extproc's tokenizer service: the model's tokenizer when --tokenizers configures it, else the "
    "chars/4 estimate (the reference's 'estimate' backend); the vLLM render URL is not called, so the decision "
    "path stays local",
    "tokenizer": "extproc's tokenizer service (deprecated reference alias of token-producer)",
    "inflight-load-producer": "extproc's own in-flight accounting per endpoint (always on)",
    "in-flight-load-producer": "extproc's own in-flight accounting per endpoint (always on)",
    "utilization-detector": "extproc's saturation detector (sheddable requests and the flow-control gate) with "
    "these thresholds",
    "approx-prefix-cache-producer": "the index of the prefix-cache-scorer that names it",
    "precise-prefix-cache-producer": "the KV-event index of the precise-prefix-cache scorer that names it",
    "burst-prefix-cache-producer": "the group placement of the burst-prefix-cache scorer that names it",
}
# Reference types we cannot honour (yet): the load fails naming the plugin and this reason.
UNSUPPORTED: dict[str, str] = {
    "multicluster-prefix-cache-scorer": "multi-cluster routing is not implemented",
    "multicluster-queue-scorer": "multi-cluster routing is not implemented",
    "multicluster-kv-cache-utilization-scorer": "multi-cluster routing is not implemented",
    "multicluster-session-affinity-filter": "multi-cluster routing is not implemented",
    "multicluster-metrics-data-source": "multi-cluster routing is not implemented",
    "multicluster-metrics-extractor": "multi-cluster routing is not implemented",
    "multicluster-file-discovery": "multi-cluster routing is not implemented",
    "anthropic-parser": "extproc parses the OpenAI API only (/v1/completions, /v1/chat/completions, /v1/responses, /v1/embeddings)",
    "sglanghttp-parser": "extproc parses the OpenAI API only",
    "vertexai-parser": "extproc parses the OpenAI API only",
    "vllmgrpc-parser": "extproc parses HTTP OpenAI requests only (no vLLM gRPC)",
    "latency-scorer": "the reference's latency plugins differ from extproc's predictor: use predicted-latency-scorer / slo-aware-picker (docs/predictor.md)",
    "predicted-latency-producer": "use extproc's predicted-latency-scorer / slo-aware-picker (docs/predictor.md)",
    "slo-headroom-tier-filter": "use extproc's slo-aware-picker (docs/predictor.md)",
    "latency-slo-admitter": "use extproc's slo-admission (docs/predictor.md)",
    "header-based-testing-filter": "conformance test plugin: run extproc serve --conformance, which honours test-epp-endpoint-selection",
    "destination-endpoint-served-verifier": "conformance test plugin: extproc serve --conformance echoes x-conformance-test-served-endpoint",
    "edf-ordering-policy": "flow-control ordering policies are not implemented (FIFO per fairness key)",
    "slo-deadline-ordering-policy": "flow-control ordering policies are not implemented (FIFO per fairness key)",
    "static-usage-limit-policy": "not implemented: use soft-reflective-ceiling-policy or the saturation detector thresholds",
    "priority-holdback-policy": "not implemented: use soft-reflective-ceiling-policy",
    "sheddable-eviction-filter": "flow-control eviction is not implemented (queued requests expire by TTL)",
    "priority-then-time-eviction-order-policy": "flow-control eviction is not implemented (queued requests expire by TTL)",
    "local-syncer": "cross-replica sync of scheduler state is not supported (one scheduler process owns its state)",
    "p2p-source-producer": "peer-to-peer KV source selection is not implemented",
    "disaggregatedset-rollout-screener": "DisaggregatedSet rollout screening is not implemented",
    "disaggregatedset-rollout-pod-extractor": "DisaggregatedSet rollout screening is not implemented",
    "concurrency-detector": "not implemented: use utilization-detector or the saturation detector's maxInflightPerPod",
    "session-affinity-filter": "not implemented: use session-affinity-scorer",
    "header-label-affinity-scorer": "not implemented",
    "session-id-producer": "not implemented: session-affinity-scorer reads its header itself",
    "agent-identity": "not implemented",
    "context-length-aware": "not implemented",
    "multicluster-approx-prefix-cache-producer": "multi-cluster routing is not implemented",
}
# Defaults the reference gives a type where ours differ: applied to llm-d.ai/v1alpha1 files when the parameter is
# absent (the older GIE shape keeps extproc's defaults, which are GIE's).
REFERENCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "active-request-scorer": {"idleThreshold": 0},
    "token-load-scorer": {"queueThresholdTokens": 4194304},
}
PARSER_TYPES = frozenset({"openai-parser", "passthrough-parser", "vllm-http-parser"})
PRODUCER_TYPES = frozenset({"approx-prefix-cache-producer", "precise-prefix-cache-producer", "burst-prefix-cache-producer"})
REFERENCE_PREFIX_PARAMS = frozenset({"prefixMatchInfoProducerName", "matchLengthWeight", "matchLengthScaleTokens"})

# approx-prefix-cache-producer defaults (llm-d-router .../dataproducer/approximateprefix/README.md)
APPROX_BLOCK_TOKENS = 16
APPROX_MIN_BLOCK_TOKENS = 64  # "values below the minimum of 64 are clamped up at request time"
APPROX_MAX_PREFIX_TOKENS = 131072
APPROX_LRU_CAPACITY = 31250


def is_reference_file(raw: Mapping[str, Any]) -> bool:
    return raw.get("apiVersion") in API_VERSIONS or raw.get("kind") == KIND


def _mapping(v: Any, what: str, plugin: str | None = None) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise TranslationError(plugin, f"{what} must be a mapping, got {v!r}")
    return dict(v)


def _int(params: Mapping[str, Any], key: str, default: int, plugin: str, minimum: int = 0) -> int:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise TranslationError(plugin, f"parameter '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def parse_feature_gates(raw: Any) -> dict[str, bool]:
    if raw is None:
        return {}
    if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
        raise TranslationError(None, "'featureGates' must be a list of gate names ('flowControl' or 'flowControl=false')")
    out: dict[str, bool] = {}
    for g in raw:
        name, _, value = g.partition("=")
        name = name.strip()
        if name not in FEATURE_GATES:
            raise TranslationError(None, f"feature gate '{name}' is unknown (known: {', '.join(FEATURE_GATES)})")
        v = value.strip().lower()
        if v in ("", "true", "1", "t"):
            out[name] = True
        elif v in ("false", "0", "f"):
            out[name] = False
        else:
            raise TranslationError(None, f"{value!r} is not a valid value for the feature gate {name}")
    return out


def _approx_params(producer: Mapping[str, Any], pname: str) -> dict[str, Any]:
    """approx-prefix-cache-producer parameters → our prefix-cache-scorer's (bytes = tokens × 4)."""
    allowed = {"autoTune", "blockSizeTokens", "maxPrefixBlocksToMatch", "maxPrefixTokensToMatch", "lruCapacityPerServer", "blockSize"}
    unknown = sorted(set(producer) - allowed)
    if unknown:
        raise TranslationError(pname, f"unknown parameter(s) {', '.join(map(repr, unknown))} (accepted: {', '.join(sorted(allowed))})")
    if "blockSize" in producer:  # deprecated character-based block size: our native unit
        block_bytes = _int(producer, "blockSize", 64, pname, 1)
        block_tokens = max(1, block_bytes // CHARS_PER_TOKEN)
    else:
        block_tokens = max(APPROX_MIN_BLOCK_TOKENS, _int(producer, "blockSizeTokens", APPROX_BLOCK_TOKENS, pname, 1))
        block_bytes = block_tokens * CHARS_PER_TOKEN
    max_tokens = _int(producer, "maxPrefixTokensToMatch", APPROX_MAX_PREFIX_TOKENS, pname)
    if max_tokens > 0:
        max_blocks = max(1, max_tokens // block_tokens)
    else:
        max_blocks = _int(producer, "maxPrefixBlocksToMatch", 2048, pname)
        if max_blocks == 0:  # both 0: the whole prompt (bounded by the model's context window)
            max_blocks = max(1, APPROX_MAX_PREFIX_TOKENS * 8 // block_tokens)
    auto = producer.get("autoTune", True)
    if not isinstance(auto, bool):
        raise TranslationError(pname, f"parameter 'autoTune' must be true or false, got {auto!r}")
    return {
        "blockSize": block_bytes,
        "maxPrefixBlocksToMatch": max_blocks,
        "lruCapacityPerServer": _int(producer, "lruCapacityPerServer", APPROX_LRU_CAPACITY, pname, 1),
        "autoTune": auto,
    }


def _precise_params(producer: Mapping[str, Any], pname: str) -> dict[str, Any]:
    """precise-prefix-cache-producer parameters → our precise-prefix-cache scorer's."""
    allowed = {"tokenProcessorConfig", "indexerConfig", "kvEventsConfig", "speculativeIndexing", "speculativeTTL", "kvCacheBackendConfigs"}
    unknown = sorted(set(producer) - allowed)
    if unknown:
        raise TranslationError(pname, f"unknown parameter(s) {', '.join(map(repr, unknown))} (accepted: {', '.join(sorted(allowed))})")
    out: dict[str, Any] = {}
    tpc = _mapping(producer.get("tokenProcessorConfig"), "parameter 'tokenProcessorConfig'", pname)
    bad = sorted(set(tpc) - {"blockSize", "blockSizeTokens", "hashSeed"})
    if bad:
        raise TranslationError(pname, f"tokenProcessorConfig: unknown field(s) {', '.join(map(repr, bad))} (accepted: blockSize, blockSizeTokens, hashSeed)")
    bs = tpc.get("blockSizeTokens", tpc.get("blockSize"))
    if bs is not None:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise TranslationError(pname, f"tokenProcessorConfig.blockSize must be an integer >= 1, got {bs!r}")
        out["blockSize"] = bs
    if "hashSeed" in tpc:
        out["hashSeed"] = str(tpc["hashSeed"])
    spec = producer.get("speculativeIndexing", False)
    if not isinstance(spec, bool):
        raise TranslationError(pname, "parameter 'speculativeIndexing' must be true or false")
    if "speculativeTTL" in producer:
        from extproc.scheduling.params import parse_duration

        try:
            ttl = parse_duration(producer["speculativeTTL"], "parameter 'speculativeTTL'")
        except (TypeError, ValueError) as e:
            raise TranslationError(pname, str(e)) from None
    else:
        ttl = 2.0
    # the reference seeds speculative entries only with speculativeIndexing: true; ours always holds in-flight
    # requests' blocks (holdInFlight) and adds speculative entries for speculativeTtlSeconds
    out["speculativeTtlSeconds"] = ttl if spec else 0.0
    kve = _mapping(producer.get("kvEventsConfig"), "parameter 'kvEventsConfig'", pname)
    bad = sorted(set(kve) - {"zmqEndpoint", "topicFilter", "concurrency", "discoverPods", "podDiscoveryConfig", "engineType"})
    if bad:
        raise TranslationError(pname, f"kvEventsConfig: unknown field(s) {', '.join(map(repr, bad))}")
    if kve.get("engineType", "vllm") != "vllm":
        raise TranslationError(pname, f"kvEventsConfig.engineType {kve['engineType']!r}: only vLLM KV events are decoded here")
    ev: dict[str, Any] = {}
    topic = kve.get("topicFilter")
    if kve.get("discoverPods"):
        port = _int(_mapping(kve.get("podDiscoveryConfig"), "podDiscoveryConfig", pname), "socketPort", 5557, pname, 1)
        ev["endpointTemplate"] = f"tcp://{{host}}:{port}"  # subscribe to each discovered pod's publisher
    elif kve.get("zmqEndpoint"):
        # The reference binds one endpoint that every pod's vLLM publisher connects to, events told apart by topic
        # kv@<pod>@<model> (llm-d-kv-cache pkg/kvevents/zmq_subscriber.go: bind unless remote). So do we.
        ep = str(kve["zmqEndpoint"])
        if not ep.startswith(("tcp://", "ipc://", "inproc://")):
            raise TranslationError(pname, f"kvEventsConfig.zmqEndpoint {ep!r} is not a ZMQ endpoint (tcp://*:5557)")
        ev["sharedEndpoint"] = ep
        ev["topicFilter"] = str(topic) if topic else "kv@"
    if topic and ev and "sharedEndpoint" not in ev:
        ev["topic"] = str(topic)
    if ev:
        out["kvEvents"] = ev
    # indexerConfig (metrics, index sizing) and kvCacheBackendConfigs (tier weights) are accepted; the tier weight
    # of a non-GPU tier is our cpuTierWeight
    backends = producer.get("kvCacheBackendConfigs")
    if isinstance(backends, list):
        for b in backends:
            if isinstance(b, Mapping) and str(b.get("name", "")).lower() not in ("gpu", "") and "weight" in b:
                w = b["weight"]
                if isinstance(w, (int, float)) and not isinstance(w, bool):
                    out["cpuTierWeight"] = max(0.0, min(1.0, float(w)))
    return out


def translate(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Origin], dict[str, bool]]:
    """Reference-shaped config → (our shape, origins by plugin name, feature gates). Raises TranslationError."""
    api = raw.get("apiVersion")
    if api is not None and api not in API_VERSIONS:
        raise TranslationError(None, f"apiVersion {api!r} is not supported (accepted: {', '.join(API_VERSIONS)})")
    kind = raw.get("kind")
    if kind is not None and kind != KIND:
        raise TranslationError(None, f"kind {kind!r} is not supported (expected {KIND})")
    unknown = sorted(k for k in raw if k not in TOP_LEVEL)
    if unknown:
        raise TranslationError(None, f"unknown top-level field(s) {', '.join(map(repr, unknown))} (accepted: {', '.join(TOP_LEVEL)})")
    if api == "inference.networking.x-k8s.io/v1alpha1":
        log.info("apiVersion inference.networking.x-k8s.io/v1alpha1 is deprecated by the reference; read as llm-d.ai/v1alpha1")
    gates = parse_feature_gates(raw.get("featureGates"))

    specs_in = raw.get("plugins") or []
    if not isinstance(specs_in, list):
        raise TranslationError(None, "'plugins' must be a list")
    specs: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(specs_in):
        if not isinstance(s, Mapping) or not s.get("type"):
            raise TranslationError(f"plugins[{i}]", "each plugin needs a 'type'")
        s = dict(s)
        s["name"] = s.get("name") or s["type"]
        if s["name"] in by_name:
            raise TranslationError(s["name"], "duplicate plugin name")
        s["parameters"] = _mapping(s.get("parameters"), "'parameters'", s["name"])
        specs.append(s)
        by_name[s["name"]] = s

    origins: dict[str, Origin] = {}
    dropped: set[str] = set()
    producers = {s["name"]: s for s in specs if s["type"] in PRODUCER_TYPES}
    reference_style = api == "llm-d.ai/v1alpha1" or bool(producers)
    out_specs: list[dict[str, Any]] = []
    for s in specs:
        t, n, p = s["type"], s["name"], s["parameters"]
        if t in UNSUPPORTED:
            raise TranslationError(n, f"plugin type '{t}' is not supported: {UNSUPPORTED[t]}")
        written = copy.deepcopy(p)
        if t == "precise-prefix-cache-scorer":  # deprecated composite: producer + scorer in one plugin
            precise = [m for m, ps in producers.items() if ps["type"] == "precise-prefix-cache-producer"]
            if precise:
                log.warning("precise-prefix-cache-scorer: a precise-prefix-cache-producer is configured; its parameters win (as in the reference)", extra={"plugin": n})
                params = _precise_params(producers[precise[0]]["parameters"], precise[0])
            else:
                params = _precise_params({k: v for k, v in p.items() if k != "prefixMatchInfoProducerName"}, n)
            params.pop("_note", None)
            out_specs.append({"type": "precise-prefix-cache", "name": n, "parameters": params})
            origins[n] = Origin(n, t, "precise-prefix-cache", "deprecated composite of precise-prefix-cache-producer + prefix-cache-scorer", written)
            continue
        if t == "prefix-cache-scorer" and (reference_style or REFERENCE_PREFIX_PARAMS & set(p)):
            new_type, new_params, note = _prefix_scorer(n, p, producers)
            out_specs.append({"type": new_type, "name": n, "parameters": new_params})
            origins[n] = Origin(n, t, new_type, note, written)
            continue
        if api == "llm-d.ai/v1alpha1" and t in REFERENCE_DEFAULTS:
            aliases = {"queueThresholdTokens": "maxTokens"}
            for k, v in REFERENCE_DEFAULTS[t].items():
                if k not in p and aliases.get(k) not in p:
                    p[k] = v
        if t in ABSORBED:
            dropped.add(n)
            origins[n] = Origin(n, t, "", ABSORBED[t], written)
            continue
        out_specs.append(s)
        origins[n] = Origin(n, t, t, "", written)

    # dataLayer: every reference must name a configured plugin; all of it is our always-on data layer
    dl = _mapping(raw.get("dataLayer"), "'dataLayer'")
    bad = sorted(set(dl) - {"sources", "injectDefaults", "discovery", "peerDiscovery", "crossReplicaSyncerPluginRef", "crossReplicaSyncInterval"})
    if bad:
        raise TranslationError(None, f"dataLayer: unknown field(s) {', '.join(map(repr, bad))}")
    for key in ("discovery", "peerDiscovery"):
        if dl.get(key):
            ref = _mapping(dl[key], f"dataLayer.{key}").get("pluginRef")
            if ref not in by_name:
                raise TranslationError(ref, f"dataLayer.{key} refers to an undefined plugin")
    if dl.get("crossReplicaSyncerPluginRef"):
        raise TranslationError(str(dl["crossReplicaSyncerPluginRef"]), "cross-replica sync of scheduler state is not supported (one scheduler process owns its state)")
    sources = dl.get("sources") or []
    if not isinstance(sources, list):
        raise TranslationError(None, "dataLayer.sources must be a list")
    for src in sources:
        src = _mapping(src, "dataLayer.sources[]")
        ref = src.get("pluginRef")
        if ref not in by_name:
            raise TranslationError(ref, "dataLayer.sources refers to an undefined plugin")
        for ex in src.get("extractors") or []:
            eref = _mapping(ex, "extractors[]").get("pluginRef")
            if eref not in by_name:
                raise TranslationError(eref, f"dataLayer source '{ref}' refers to an undefined extractor")

    # requestHandler.parsers / parser: must name parser plugins
    rh = _mapping(raw.get("requestHandler"), "'requestHandler'")
    if set(rh) - {"parsers"}:
        raise TranslationError(None, f"requestHandler: unknown field(s) {sorted(set(rh) - {'parsers'})}")
    parser_refs = [_mapping(x, "requestHandler.parsers[]").get("pluginRef") for x in rh.get("parsers") or []]
    if raw.get("parser"):
        parser_refs.append(_mapping(raw["parser"], "'parser'").get("pluginRef"))
    for ref in parser_refs:
        if ref not in by_name:
            raise TranslationError(ref, "a parser reference names an undefined plugin")
        if by_name[ref]["type"] not in PARSER_TYPES:
            raise TranslationError(ref, f"is a '{by_name[ref]['type']}', not a parser plugin")

    # profiles: references to absorbed plugins are dropped (the reference ignores non-scheduling plugins there too)
    profiles_out: list[Any] = []
    for prof in raw.get("schedulingProfiles") or []:
        if not isinstance(prof, Mapping):
            profiles_out.append(prof)
            continue
        prof = dict(prof)
        refs = []
        for ref in prof.get("plugins") or []:
            if isinstance(ref, Mapping) and ref.get("pluginRef") in dropped:
                log.info(
                    "profile plugin is not a filter, scorer or picker: ignored in the profile as the reference does",
                    extra={"profile": prof.get("name"), "plugin": ref.get("pluginRef")},
                )
                continue
            refs.append(ref)
        prof["plugins"] = refs
        profiles_out.append(prof)

    out: dict[str, Any] = {"plugins": out_specs, "schedulingProfiles": profiles_out}
    if "objectives" in raw:
        out["objectives"] = raw["objectives"]
    out["flowControl"] = _flow_control(raw, gates, by_name, dropped)
    sat = raw.get("saturationDetector")
    if isinstance(sat, Mapping) and "pluginRef" in sat:
        ref = sat["pluginRef"]
        if ref not in by_name:
            raise TranslationError(ref, "saturationDetector refers to an undefined plugin")
        out["saturationDetector"] = detector_params(by_name[ref])
    elif sat is not None:
        out["saturationDetector"] = sat
    elif "saturationDetector" in out["flowControl"]:
        out["saturationDetector"] = dict(out["flowControl"]["saturationDetector"])
    for o in origins.values():
        if o.note:
            log.info("reference plugin accepted", extra={"plugin": o.name, "type": o.reference_type, "maps_to": o.note})
    return out, origins, gates


def _prefix_scorer(name: str, params: Mapping[str, Any], producers: Mapping[str, dict[str, Any]]) -> tuple[str, dict[str, Any], str]:
    """The reference's prefix-cache-scorer + its producer → one of our scorers."""
    allowed = {"prefixMatchInfoProducerName", "matchLengthWeight", "matchLengthScaleTokens",
               "blockSize", "hashBlockSize", "maxPrefixBlocksToMatch", "lruCapacityPerServer", "autoTune"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise TranslationError(name, f"unknown parameter(s) {', '.join(map(repr, unknown))} (accepted: {', '.join(sorted(allowed))})")
    ours = {k: v for k, v in params.items() if k not in REFERENCE_PREFIX_PARAMS}
    extra = {k: params[k] for k in ("matchLengthWeight", "matchLengthScaleTokens") if k in params}
    pname = params.get("prefixMatchInfoProducerName")
    if pname is None:
        approx = [n for n, s in producers.items() if s["type"] == "approx-prefix-cache-producer"]
        pname = approx[0] if len(approx) == 1 else None
    if pname is None:
        base = _approx_params({}, name)
        base.update(ours)
        base.update(extra)
        return "prefix-cache-scorer", base, "approximate prefix index with the reference's default approx producer (64-token blocks, 128K-token cap)"
    prod = producers.get(pname)
    if prod is None:
        raise TranslationError(name, f"prefixMatchInfoProducerName '{pname}' names no approx- or precise-prefix-cache-producer in this file")
    if prod["type"] == "approx-prefix-cache-producer":
        base = _approx_params(prod["parameters"], pname)
        base.update(ours)
        base.update(extra)
        return "prefix-cache-scorer", base, f"approximate prefix index configured by producer '{pname}'"
    if ours or extra:
        raise TranslationError(name, f"parameters {sorted({**ours, **extra})} do not apply to the producer '{pname}'")
    if prod["type"] == "burst-prefix-cache-producer":
        return "burst-prefix-cache", dict(prod["parameters"]), f"burst co-location configured by producer '{pname}' (online placement, no batch window)"
    params = _precise_params(prod["parameters"], pname)
    note = f"precise KV-event index configured by producer '{pname}'"
    if "_note" in params:
        note += "; " + params.pop("_note")
    return "precise-prefix-cache", params, note


def detector_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A ``utilization-detector`` plugin's parameters → our saturation detector's thresholds."""
    name, t, p = spec["name"], spec["type"], spec["parameters"]
    if t != "utilization-detector":
        raise TranslationError(name, f"a '{t}' cannot be the saturation detector (supported: utilization-detector)")
    allowed = {"queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold", "headroom"}
    bad = sorted(set(p) - allowed)
    if bad:
        raise TranslationError(name, f"unknown parameter(s) {', '.join(map(repr, bad))} (accepted: {', '.join(sorted(allowed))})")
    out: dict[str, Any] = {}
    if "queueDepthThreshold" in p:
        out["queueDepthThreshold"] = _int(p, "queueDepthThreshold", 5, name, 1)
    if "kvCacheUtilThreshold" in p:
        v = p["kvCacheUtilThreshold"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
            raise TranslationError(name, f"parameter 'kvCacheUtilThreshold' must be in (0, 1], got {v!r}")
        out["kvCacheUtilThreshold"] = float(v)
    from extproc.scheduling.params import parse_duration

    try:
        out["metricsStalenessThresholdSeconds"] = parse_duration(p.get("metricsStalenessThreshold", "200ms"), "parameter 'metricsStalenessThreshold'")
    except (TypeError, ValueError) as e:
        raise TranslationError(name, str(e)) from None
    h = p.get("headroom", 0.0)
    if isinstance(h, bool) or not isinstance(h, (int, float)) or h < 0:
        raise TranslationError(name, f"parameter 'headroom' must be a number >= 0, got {h!r}")
    if h:
        raise TranslationError(name, "headroom > 0 configures the detector's filter role, which extproc does not have "
                               "(use utilization-filter in the profile)")
    return out


def _flow_control(raw: Mapping[str, Any], gates: Mapping[str, bool], by_name: Mapping[str, dict[str, Any]], dropped: set[str]) -> dict[str, Any]:
    """The reference's flowControl section → ours (``enabled``, ``maxQueueLength``, ``queueTtlSeconds``,
    ``saturationDetector``, plus the policy plugin references, kept for the admission layer)."""
    fc = _mapping(raw.get("flowControl"), "'flowControl'")
    ours_keys = {"enabled", "maxQueueLength", "queueTtlSeconds"}
    ref_keys = {"maxBytes", "maxRequests", "defaultRequestTTL", "noEndpointRequestTTL", "defaultPriorityBand",
                "defaultNegativePriorityBand", "priorityBands", "usageLimitPolicyPluginRef", "saturationDetector", "enableEviction"}
    bad = sorted(set(fc) - ours_keys - ref_keys)
    if bad:
        raise TranslationError(None, f"flowControl: unknown field(s) {', '.join(map(repr, bad))}")
    out: dict[str, Any] = {k: fc[k] for k in ours_keys if k in fc}
    if "flowControl" in gates:
        out["enabled"] = gates["flowControl"]
    if "defaultRequestTTL" in fc:
        from extproc.scheduling.params import parse_duration

        try:
            out["queueTtlSeconds"] = parse_duration(fc["defaultRequestTTL"], "flowControl.defaultRequestTTL")
        except (TypeError, ValueError) as e:
            raise TranslationError(None, str(e)) from None
    if "maxRequests" in fc:
        mr = fc["maxRequests"]
        if isinstance(mr, str) and mr.isdigit():
            mr = int(mr)
        if isinstance(mr, bool) or not isinstance(mr, int) or mr < 1:
            raise TranslationError(None, f"flowControl.maxRequests must be a positive integer, got {mr!r}")
        out["maxQueueLength"] = mr
    sd = fc.get("saturationDetector")
    if sd is not None:
        sd = _mapping(sd, "flowControl.saturationDetector")
        ref = sd.get("pluginRef")
        if ref is not None:
            if ref not in by_name:
                raise TranslationError(ref, "flowControl.saturationDetector refers to an undefined plugin")
            rest = {k: v for k, v in sd.items() if k != "pluginRef"}
            if rest:
                raise TranslationError(ref, f"flowControl.saturationDetector takes a pluginRef or thresholds, not both ({sorted(rest)})")
            out["saturationDetector"] = detector_params(by_name[ref])
        else:
            out["saturationDetector"] = sd
    for key in ("usageLimitPolicyPluginRef",):
        if fc.get(key):
            if fc[key] not in by_name:
                raise TranslationError(fc[key], f"flowControl.{key} refers to an undefined plugin")
            out[key] = fc[key]
    bands = []
    for key in ("defaultPriorityBand", "defaultNegativePriorityBand"):
        if fc.get(key) is not None:
            bands.append((key, _mapping(fc[key], f"flowControl.{key}")))
    for i, b in enumerate(fc.get("priorityBands") or []):
        bands.append((f"priorityBands[{i}]", _mapping(b, f"flowControl.priorityBands[{i}]")))
    prios = []
    for i, b in enumerate(fc.get("priorityBands") or []):
        pr = _mapping(b, f"flowControl.priorityBands[{i}]").get("priority")
        if isinstance(pr, bool) or not isinstance(pr, int):
            raise TranslationError(None, f"flowControl.priorityBands[{i}].priority must be an integer")
        prios.append(pr)
    if prios:
        out["bandPriorities"] = prios
    for where, b in bands:
        for k in ("fairnessPolicyRef", "orderingPolicyRef"):
            ref = b.get(k)
            if ref is not None and ref not in by_name:
                raise TranslationError(ref, f"flowControl.{where}.{k} refers to an undefined plugin")
            if k == "orderingPolicyRef" and ref is not None and by_name[ref]["type"] == "fcfs-ordering-policy":
                continue  # FIFO within a fairness key is what extproc does
            if ref is not None:
                out.setdefault("policyRefs", {})[f"{where}.{k}"] = ref
    return out
