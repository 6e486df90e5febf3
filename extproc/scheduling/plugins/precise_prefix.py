"""``precise-prefix-cache``: token-exact prefix-cache affinity from vLLM KV events.

score(pod) = (GPU-resident matched blocks + ``cpuTierWeight`` × blocks matched only in an offload tier)
/ total blocks of the request, where "matched" is the longest run of the request's leading token blocks the
pod can serve (``extproc.datalayer.kvindex`` explains the hybrid-model group rules). The request's token ids
come from ``extproc.datalayer.tokenize`` (the model's own tokenizer and chat template, or the simulator's);
block size is what the pod's events report, else ``vllm:cache_config_info{block_size}``, else ``blockSize``.

On dispatch (pre-request hook) the request's blocks are inserted for the chosen pod as speculative entries
with a short TTL (``speculativeTtlSeconds``, default 2 s) so a burst of requests sharing a prefix sees the
first one's choice before the engine's BlockStored events arrive; a BlockStored confirms them.

When no tokenizer is configured for the model (or tokenization fails), the scorer falls back to the approximate
character-block method and REUSES the ``prefix-cache-scorer``'s shared index (``ctx.services["prefix_index"]``,
created if absent), including its optimistic insert on dispatch: both scorers then agree on one index.

Cycle outputs for the latency predictor: ``cycle.data["prefix_scores"]`` ({address: score}),
``cycle.data["prompt_token_ids"]`` (when tokenized), ``prefix_matched_blocks``, ``prefix_total_blocks``,
``prefix_block_size`` (tokens when precise; bytes in fallback) and ``prefix_precise`` (bool).

Shared services (created once per config, reused by every instance): ``kv_index`` (KVBlockIndex),
``kv_events`` (KVEventManager; the server must ``await start()`` / ``await stop()`` it) and ``tokenizers``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from extproc.plugin import (
    PREFIX_BLOCK_SIZE,
    PREFIX_CACHED_TOKENS,
    PREFIX_MATCHED_BLOCKS,
    PREFIX_SCORES,
    PREFIX_TOTAL_BLOCKS,
    PROMPT_TOKEN_IDS,
    CycleState,
    Endpoint,
    InferenceRequest,
    Observation,
    PluginContext,
    SchedulingResult,
    check_keys,
    get_bool,
    get_float,
    get_int,
    register,
)
from extproc.api import CHARS_PER_TOKEN
from extproc.datalayer.kvevents import KV_EVENTS, KVEventManager, SourceTemplate, sources_from_json
from extproc.datalayer.kvindex import KV_INDEX, KVBlockIndex, PrefixMatch
from extproc.datalayer.tokenize import TOKENIZERS, Tokenizers
from extproc.scheduling.plugins.prefix import (
    DEFAULT_BLOCK_SIZE as APPROX_BLOCK_SIZE,
    DEFAULT_LOAD_SLACK,
    bounded_load,
    DEFAULT_LRU_CAPACITY_PER_SERVER,
    DEFAULT_MAX_PREFIX_BLOCKS,
    PrefixIndex,
    hash_prompt,
    shared_index,
)

log = logging.getLogger(__name__)

SERVICE_INDEX = KV_INDEX
SERVICE_EVENTS = KV_EVENTS
SERVICE_TOKENIZERS = TOKENIZERS
DEFAULT_TOKEN_BLOCK_SIZE = 16  # vLLM's default block size on GPU
DEFAULT_MAX_BLOCKS = 1024
DEFAULT_MAX_KEYS = 1_000_000
DEFAULT_MAX_HOLD_S = 600.0  # an in-flight hold whose completion never came is dropped after this long

CYCLE_SCORES = PREFIX_SCORES
CYCLE_TOKENS = PROMPT_TOKEN_IDS
CYCLE_MATCHED = PREFIX_MATCHED_BLOCKS
CYCLE_TOTAL = PREFIX_TOTAL_BLOCKS
CYCLE_BLOCK_SIZE = PREFIX_BLOCK_SIZE
CYCLE_PRECISE = "prefix_precise"


@dataclass(slots=True)
class _State:
    precise: bool
    keys_by_bs: dict[int, list[int]]  # block size → keys (precise) / {approx block size: hashes} (fallback)
    block_size_of: dict[str, int]  # candidate address → block size used
    matches: dict[str, PrefixMatch]
    approx_matched: dict[str, int]


def _manager_from_params(ctx: PluginContext, index: KVBlockIndex, params: Mapping[str, Any]) -> KVEventManager:
    check_keys(params, ("sources", "endpointTemplate", "replayEndpointTemplate", "topic", "bind", "replayTimeoutSeconds", "sharedEndpoint", "topicFilter"))
    sources = sources_from_json(params.get("sources") or {})
    template = None
    if params.get("endpointTemplate"):
        template = SourceTemplate(
            str(params["endpointTemplate"]),
            str(params["replayEndpointTemplate"]) if params.get("replayEndpointTemplate") else None,
            str(params.get("topic") or ""),
            bool(params.get("bind", False)),
        )
    timeout = get_float(params, "replayTimeoutSeconds", 1.0, minimum=0.01)
    # one endpoint we bind and every pod's publisher connects to, pods told apart by topic kv@<pod>@<model>
    shared = params.get("sharedEndpoint")
    if shared is not None and (not isinstance(shared, str) or not shared.startswith(("tcp://", "ipc://", "inproc://"))):
        raise ValueError(f"parameter 'sharedEndpoint' must be a ZMQ endpoint such as tcp://*:5557, not {shared!r}")
    topic_filter = params.get("topicFilter", "kv@")
    if not isinstance(topic_filter, str):
        raise TypeError("parameter 'topicFilter' must be a string")
    return KVEventManager(ctx.pool, index, sources, template, timeout, shared_endpoint=shared or None, shared_topic_filter=topic_filter)


def _hold_id(request: InferenceRequest) -> str:
    # x-request-id comes from clients and may repeat; the object identity keeps two live requests apart.
    return f"{request.request_id}:{id(request):x}"


@register
class PrecisePrefixCacheScorer:
    type_name: ClassVar[str] = "precise-prefix-cache"
    __slots__ = (
        "name",
        "index",
        "tokenizers",
        "events",
        "block_size",
        "max_blocks",
        "speculative_ttl_s",
        "hold_in_flight",
        "max_hold_s",
        "cpu_weight",
        "approx_index",
        "approx_block_size",
        "approx_max_blocks",
        "_state_key",
        "load_factor",
        "load_slack",
    )

    def __init__(
        self,
        name: str = "precise-prefix-cache",
        index: KVBlockIndex | None = None,
        tokenizers: Tokenizers | None = None,
        *,
        events: KVEventManager | None = None,
        block_size: int = DEFAULT_TOKEN_BLOCK_SIZE,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        speculative_ttl_s: float = 2.0,
        hold_in_flight: bool = True,
        max_hold_s: float = DEFAULT_MAX_HOLD_S,
        cpu_weight: float = 0.5,
        approx_index: PrefixIndex | None = None,
        approx_block_size: int = APPROX_BLOCK_SIZE,
        approx_max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
        load_factor: float = 0.0,
        load_slack: float = DEFAULT_LOAD_SLACK,
    ) -> None:
        if block_size <= 0 or max_blocks <= 0:
            raise ValueError("blockSize and maxPrefixBlocksToMatch must be > 0")
        self.name = name
        self.index = index if index is not None else KVBlockIndex()
        self.tokenizers = tokenizers if tokenizers is not None else Tokenizers()
        self.events = events
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.speculative_ttl_s = speculative_ttl_s
        self.hold_in_flight = hold_in_flight
        self.max_hold_s = max_hold_s
        self.cpu_weight = cpu_weight
        self.approx_index = approx_index if approx_index is not None else PrefixIndex()
        self.approx_block_size = approx_block_size
        self.approx_max_blocks = approx_max_blocks
        self.load_factor = load_factor
        self.load_slack = load_slack
        self._state_key = f"precise_prefix:{id(self.index)}:{block_size}:{max_blocks}"

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "PrecisePrefixCacheScorer":
        check_keys(
            params,
            (
                "blockSize",
                "maxPrefixBlocksToMatch",
                "maxKeys",
                "hashSeed",
                "speculativeTtlSeconds",
                "holdInFlight",
                "maxHoldSeconds",
                "cpuTierWeight",
                "tokenizers",
                "kvEvents",
                "fallbackBlockSize",
                "fallbackLruCapacityPerServer",
                "boundedLoadFactor",
                "boundedLoadSlack",
            ),
        )
        index = ctx.services.get(SERVICE_INDEX)
        if index is None:
            seed = params.get("hashSeed", "")
            if not isinstance(seed, str):
                raise TypeError("parameter 'hashSeed' must be a string")
            index = KVBlockIndex(get_int(params, "maxKeys", DEFAULT_MAX_KEYS, minimum=1), hash_seed=seed)
            ctx.services[SERVICE_INDEX] = index
        elif not isinstance(index, KVBlockIndex):
            raise TypeError(f"service '{SERVICE_INDEX}' is a {type(index).__name__}, not a KVBlockIndex")
        events = ctx.services.get(SERVICE_EVENTS)
        if events is None:
            ev_params = params.get("kvEvents") or {}
            if not isinstance(ev_params, Mapping):
                raise TypeError("parameter 'kvEvents' must be a mapping")
            events = _manager_from_params(ctx, index, ev_params)
            ctx.services[SERVICE_EVENTS] = events
        toks = ctx.services.get(SERVICE_TOKENIZERS)
        if toks is None:
            specs = params.get("tokenizers") or {}
            if not isinstance(specs, Mapping):
                raise TypeError("parameter 'tokenizers' must be a mapping model → {kind, path}")
            toks = Tokenizers(specs)
            ctx.services[SERVICE_TOKENIZERS] = toks
        capacity = get_int(params, "fallbackLruCapacityPerServer", DEFAULT_LRU_CAPACITY_PER_SERVER, minimum=1)
        return cls(
            name,
            index,
            toks,
            events=events,
            block_size=get_int(params, "blockSize", DEFAULT_TOKEN_BLOCK_SIZE, minimum=1),
            max_blocks=get_int(params, "maxPrefixBlocksToMatch", DEFAULT_MAX_BLOCKS, minimum=1),
            speculative_ttl_s=get_float(params, "speculativeTtlSeconds", 2.0, minimum=0.0),
            hold_in_flight=get_bool(params, "holdInFlight", True),
            max_hold_s=get_float(params, "maxHoldSeconds", DEFAULT_MAX_HOLD_S, minimum=0.0),
            cpu_weight=get_float(params, "cpuTierWeight", 0.5, minimum=0.0, maximum=1.0),
            approx_index=shared_index(ctx, capacity),
            approx_block_size=get_int(params, "fallbackBlockSize", APPROX_BLOCK_SIZE, minimum=1),
            load_factor=get_float(params, "boundedLoadFactor", 0.0, minimum=0.0),
            load_slack=get_float(params, "boundedLoadSlack", DEFAULT_LOAD_SLACK, minimum=0.0),
        )

    # ---------------------------------------------------------------- scoring
    def _block_size_for(self, ep: Endpoint) -> int:
        return self.index.block_size_of(ep.address) or ep.metrics.block_size or self.block_size

    def _state(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> _State:
        st: _State | None = cycle.data.get(self._state_key)
        if st is not None:
            return st
        tokens = request.prompt_token_ids
        if tokens is None:
            tokens = self.tokenizers.tokenize(request)
        if tokens is None:
            hashes = hash_prompt(request.prompt_text, request.target_model, self.approx_block_size, self.approx_max_blocks)
            st = _State(False, {self.approx_block_size: hashes}, {}, {}, self.approx_index.match(hashes))
        else:
            request.prompt_token_ids = tokens
            cycle.data[CYCLE_TOKENS] = tokens
            lora = self.tokenizers.lora_of(request.target_model)
            by_bs: dict[str, int] = {e.address: self._block_size_for(e) for e in candidates}
            keys_by_bs: dict[int, list[int]] = {}
            matches: dict[str, PrefixMatch] = {}
            for bs in set(by_bs.values()):
                limit = min(len(tokens), bs * self.max_blocks)
                keys = self.index.keys_for(tokens[:limit] if limit < len(tokens) else tokens, bs, lora)
                keys_by_bs[bs] = keys
                matches.update(self.index.match(keys, [a for a, b in by_bs.items() if b == bs]))
            st = _State(True, keys_by_bs, by_bs, matches, {})
        cycle.data[self._state_key] = st
        return st

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        st = self._state(cycle, request, candidates)
        data = cycle.data
        data[CYCLE_PRECISE] = st.precise
        scores: list[float] = []
        if st.precise:
            w = self.cpu_weight
            matched: dict[str, int] = {}
            total_any = 0
            for e in candidates:
                bs = st.block_size_of.get(e.address) or self._block_size_for(e)
                keys = st.keys_by_bs.get(bs)
                total = len(keys) if keys else 0
                total_any = max(total_any, total)
                m = st.matches.get(e.address)
                if not total or m is None or m.blocks == 0:
                    scores.append(0.0)
                    continue
                matched[e.address] = m.blocks
                scores.append((m.gpu_blocks + w * (m.blocks - m.gpu_blocks)) / total)
            data[CYCLE_MATCHED] = matched
            data[PREFIX_CACHED_TOKENS] = {
                a: b * (st.block_size_of.get(a) or self.block_size) for a, b in matched.items()
            }
            data[CYCLE_TOTAL] = total_any
            data[CYCLE_BLOCK_SIZE] = next(iter(st.keys_by_bs), self.block_size)
        else:
            (hashes,) = st.keys_by_bs.values()
            total = len(hashes)
            inv = 1.0 / total if total else 0.0
            scores = [st.approx_matched.get(e.address, 0) * inv for e in candidates]
            data[CYCLE_MATCHED] = dict(st.approx_matched)
            tok = self.approx_block_size / CHARS_PER_TOKEN
            data[PREFIX_CACHED_TOKENS] = {a: int(b * tok) for a, b in st.approx_matched.items()}
            data[CYCLE_TOTAL] = total
            data[CYCLE_BLOCK_SIZE] = self.approx_block_size
        data[CYCLE_SCORES] = {e.address: s for e, s in zip(candidates, scores)}
        return bounded_load(scores, candidates, self.load_factor, self.load_slack)

    # ---------------------------------------------------------------- dispatch
    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        target = result.primary
        if target.removed:
            return
        st: _State | None = cycle.data.get(self._state_key)
        if st is None:
            st = self._state(cycle, request, [target])
        if not st.precise:
            (hashes,) = st.keys_by_bs.values()
            self.approx_index.record(st.approx_matched.get(target.address, 0) if hashes else 0)
            if hashes:
                self.approx_index.add(hashes, target.address)
            return
        bs = st.block_size_of.get(target.address) or self._block_size_for(target)
        keys = st.keys_by_bs.get(bs)
        if keys is None and request.prompt_token_ids is not None:
            keys = self.index.keys_for(request.prompt_token_ids, bs, self.tokenizers.lora_of(request.target_model))
        if not keys:
            return
        if self.hold_in_flight:
            self.index.hold(_hold_id(request), target.address, keys, self.max_hold_s)
        else:
            self.index.add_speculative(target.address, keys, self.speculative_ttl_s)

    def on_complete(self, request: InferenceRequest, observation: Observation) -> None:
        """The request finished (any way): its in-flight hold ends; the pod's KV events say what stays cached."""
        if self.hold_in_flight:
            self.index.release(_hold_id(request))

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index.snapshot_stats(), "tokenize": asdict(self.tokenizers.stats)}
        if self.events is not None:
            out["events"] = self.events.stats()
        return out
