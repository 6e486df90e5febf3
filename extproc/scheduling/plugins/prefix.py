"""``prefix-cache-scorer``: approximate prefix-cache affinity without a tokenizer (GIE semantics).

How it works (kubernetes-sigs/gateway-api-inference-extension pkg/epp/scheduling/framework/plugins/multi/prefix):

- The request's prompt text (the prompt, or the JSON of the chat messages) is UTF-8 encoded and cut into blocks of
  ``blockSize`` bytes (default 64 ≈ vLLM's 16-token KV block × 4 characters per token); a trailing partial block
  is ignored and at most ``maxPrefixBlocksToMatch`` (256) blocks are hashed.
- Block hashes are chained: h₀ = xxh64(block₀, seed = xxh64(target model)), hᵢ = xxh64(blockᵢ, seed = hᵢ₋₁), so
  a hash identifies the whole prefix up to its block, and different models never share entries.
- A shared ``PrefixIndex`` remembers, per pod, an LRU of the block hashes recently sent to it (default 31,250 blocks
  per pod; with ``autoTune: true`` a pod reporting ``vllm:cache_config_info`` gets num_gpu_blocks × block_size ×
  4 / blockSize blocks, its real KV capacity in our block units).
- score(pod) = longest run of leading blocks the pod holds / number of blocks of the request (0 if the prompt is
  shorter than one block).
- As a pre-request hook, the request's hashes are inserted for the chosen primary pod when it is dispatched
  (optimistic: the pod will hold the prefix once it has prefilled it).

Unlike GIE, the model-name hash is the seed of the chain rather than an extra block, so a pod that served *some*
request for the model does not get a free one-block match for every request.

Per-cycle outputs for other plugins (the latency predictor): ``cycle.data["prefix_scores"]`` ({address: score}
for every candidate), ``cycle.data["prefix_matched_blocks"]`` ({address: matched blocks}),
``cycle.data["prefix_total_blocks"]``, ``cycle.data["prefix_block_size"]`` and
``PREFIX_CACHED_TOKENS`` ({address: matched bytes / 4}, the estimated prompt tokens a pod holds; the P/D decider
reads it). The keys are the shared ``CycleKey`` constants of :mod:`extproc.plugin`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import xxhash

from extproc.plugin import (
    PREFIX_BLOCK_SIZE,
    PREFIX_CACHED_TOKENS,
    PREFIX_MATCHED_BLOCKS,
    PREFIX_SCORES,
    PREFIX_TOTAL_BLOCKS,
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    SchedulingResult,
    check_keys,
    get_bool,
    get_float,
    get_int,
    register,
)
from extproc.api import CHARS_PER_TOKEN
from extproc.services import ServiceKey

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 64  # bytes of prompt per hash block: 16 tokens × 4 chars
DEFAULT_MAX_PREFIX_BLOCKS = 256
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250
DEFAULT_LOAD_SLACK = 4.0  # bounded load: in-flight requests a pod may exceed the scaled mean by
SERVICE_KEY: ServiceKey[PrefixIndex] = ServiceKey("prefix_index")
SCORER_SERVICE_KEY: ServiceKey[PrefixCacheScorer] = ServiceKey("prefix_scorer")

# cycle.data keys shared with other plugins (the latency predictor reads them).
CYCLE_SCORES = PREFIX_SCORES
CYCLE_MATCHED = PREFIX_MATCHED_BLOCKS
CYCLE_TOTAL = PREFIX_TOTAL_BLOCKS
CYCLE_BLOCK_SIZE = PREFIX_BLOCK_SIZE

_xxh64 = xxhash.xxh64_intdigest


def hash_prompt(text: str, model: str, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS) -> list[int]:
    """Chained xxh64 hashes of the full ``block_size``-byte blocks of ``text`` (at most ``max_blocks``)."""
    limit = block_size * max_blocks
    data = text[:limit].encode("utf-8")  # a char is ≥ 1 byte, so this holds every byte we can hash
    n = len(data) // block_size
    if n > max_blocks:
        n = max_blocks
    if n == 0:
        return []
    mv = memoryview(data)
    h = _xxh64(model.encode("utf-8"))
    out: list[int] = []
    append = out.append
    for start in range(0, n * block_size, block_size):
        h = _xxh64(mv[start : start + block_size], h)
        append(h)
    return out


class PrefixIndex:
    """Which pods probably hold which prefix blocks: hash → set of pod addresses, plus a per-pod LRU of hashes.

    Memory is bounded by (pods in the pool) × (per-pod capacity): every insert evicts the pod's least recently
    used blocks beyond its capacity, and a pod's entries are dropped when it leaves the pool. Everything runs on
    the event-loop thread; there is no locking.
    """

    __slots__ = ("default_capacity", "_hash_to_pods", "_pods", "_capacity", "lookups", "hits", "on_add")

    def __init__(self, default_capacity: int = DEFAULT_LRU_CAPACITY_PER_SERVER) -> None:
        if default_capacity <= 0:
            raise ValueError(f"LRU capacity per server must be > 0, got {default_capacity}")
        self.default_capacity = default_capacity
        self._hash_to_pods: dict[int, set[str]] = {}
        self._pods: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self.lookups = 0  # dispatched requests looked up
        self.hits = 0  # dispatched requests whose chosen pod matched ≥ 1 block
        # called after every local insert (the replication layer shares it with the other scheduler replicas)
        self.on_add: Callable[[Sequence[int], str], None] | None = None

    # -- queries ---------------------------------------------------------------------------------------------

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """{pod address: number of leading blocks of ``hashes`` the pod holds} for pods with ≥ 1 block."""
        res: dict[str, int] = {}
        if not hashes:
            return res
        h2p = self._hash_to_pods
        first = h2p.get(hashes[0])
        if not first:
            return res
        alive = set(first)
        depth = 1
        for i in range(1, len(hashes)):
            pods = h2p.get(hashes[i])
            if not pods:
                break
            if not (alive <= pods):
                survivors = alive & pods
                for a in alive - survivors:
                    res[a] = depth
                alive = survivors
                if not alive:
                    break
            depth = i + 1
        for a in alive:
            res[a] = depth
        return res

    def blocks_of(self, address: str) -> int:
        lru = self._pods.get(address)
        return len(lru) if lru is not None else 0

    def capacity_of(self, address: str) -> int:
        return self._capacity.get(address, self.default_capacity)

    @property
    def blocks_indexed(self) -> int:
        return sum(len(lru) for lru in self._pods.values())

    def pods(self) -> list[str]:
        return list(self._pods)

    def stats(self) -> dict[str, int]:
        return {"lookups": self.lookups, "hits": self.hits, "blocks_indexed": self.blocks_indexed}

    def record(self, matched_blocks: int) -> None:
        self.lookups += 1
        if matched_blocks > 0:
            self.hits += 1

    # -- updates ---------------------------------------------------------------------------------------------

    def set_capacity(self, address: str, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if self._capacity.get(address) == capacity:
            return
        self._capacity[address] = capacity
        lru = self._pods.get(address)
        if lru is not None:
            self._evict(address, lru, capacity)

    def add(self, hashes: Sequence[int], address: str) -> None:
        """Record that ``address`` now holds the prefix ``hashes``.

        Blocks are touched from the last to the first, so the leading (most shared) blocks are the most recently
        used and a long prompt evicts its own tail before its head, as vLLM frees a request's blocks tail first.
        """
        if not hashes:
            return
        self.add_remote(hashes, address)
        cb = self.on_add
        if cb is not None:
            cb(hashes, address)

    def add_remote(self, hashes: Sequence[int], address: str) -> None:
        """:meth:`add` without telling ``on_add``: an insert another scheduler replica made."""
        if not hashes:
            return
        lru = self._pods.get(address)
        if lru is None:
            lru = self._pods[address] = OrderedDict()
        h2p = self._hash_to_pods
        move = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                move(h)
            else:
                lru[h] = None
                pods = h2p.get(h)
                if pods is None:
                    h2p[h] = {address}
                else:
                    pods.add(address)
        self._evict(address, lru, self._capacity.get(address, self.default_capacity))

    def _evict(self, address: str, lru: OrderedDict[int, None], capacity: int) -> None:
        h2p = self._hash_to_pods
        while len(lru) > capacity:
            h, _ = lru.popitem(last=False)
            pods = h2p.get(h)
            if pods is not None:
                pods.discard(address)
                if not pods:
                    del h2p[h]

    def remove_pod(self, address: str) -> None:
        lru = self._pods.pop(address, None)
        self._capacity.pop(address, None)
        if lru is None:
            return
        h2p = self._hash_to_pods
        for h in lru:
            pods = h2p.get(h)
            if pods is not None:
                pods.discard(address)
                if not pods:
                    del h2p[h]
        log.debug("prefix index dropped pod", extra={"endpoint": address, "blocks": len(lru)})

    def on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        """``EndpointPool`` listener: forget pods that left the pool."""
        for e in removed:
            self.remove_pod(e.address)


def shared_index(ctx: PluginContext, capacity: int) -> PrefixIndex:
    """The config's shared ``PrefixIndex`` (``ctx.services["prefix_index"]``), created and subscribed to pool
    membership changes on first use."""
    existing = ctx.services.get(SERVICE_KEY)
    if existing is not None:
        if not isinstance(existing, PrefixIndex):
            raise TypeError(f"service '{SERVICE_KEY}' is a {type(existing).__name__}, not a PrefixIndex")
        if existing.default_capacity != capacity:
            log.warning(
                "prefix index already exists with another per-pod capacity; keeping it",
                extra={"existing": existing.default_capacity, "requested": capacity},
            )
        return existing
    index = PrefixIndex(capacity)
    ctx.pool.add_listener(index.on_pool_change)
    ctx.services[SERVICE_KEY] = index
    return index


def bounded_load(scores: list[float], candidates: Sequence[Endpoint], factor: float, slack: float) -> list[float]:
    """Herd limit for prefix affinity (consistent hashing with bounded loads, Mirrokni et al. 2018): a pod whose
    own in-flight count exceeds ``factor`` × the candidates' mean + ``slack`` loses its prefix score for this
    request, so a cold fleet under a burst spreads a hot prefix over more pods instead of piling it onto the first
    pod that got it. In-flight counts are ours (updated at every dispatch), not a scrape that lags a burst.
    sglang-router's cache_aware policy (sgl-project/sglang, rust/README.md: ``--balance-abs-threshold``,
    ``--balance-rel-threshold``) switches the whole fleet to shortest-queue when max/min load diverge; bounding
    each pod keeps the affinity of every pod that is not overloaded. ``factor`` ≤ 0: off."""
    n = len(candidates)
    if factor <= 0.0 or n < 2:
        return scores
    total = 0
    for e in candidates:
        total += e.inflight
    cap = factor * total / n + slack
    return [0.0 if s > 0.0 and e.inflight > cap else s for s, e in zip(scores, candidates)]


@register
class PrefixCacheScorer:
    type_name: ClassVar[str] = "prefix-cache-scorer"
    __slots__ = ("name", "block_size", "max_blocks", "auto_tune", "index", "_state_key", "length_weight", "length_scale",
                 "load_factor", "load_slack")

    def __init__(
        self,
        name: str = "prefix-cache-scorer",
        index: PrefixIndex | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
        auto_tune: bool = False,
        length_weight: float = 0.0,
        length_scale_tokens: int = 8192,
        load_factor: float = 0.0,
        load_slack: float = DEFAULT_LOAD_SLACK,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"parameter 'blockSize' must be > 0, got {block_size}")
        if max_blocks <= 0:
            raise ValueError(f"parameter 'maxPrefixBlocksToMatch' must be > 0, got {max_blocks}")
        self.name = name
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.auto_tune = auto_tune
        self.length_weight = length_weight
        self.length_scale = length_scale_tokens
        self.load_factor = load_factor
        self.load_slack = load_slack
        self.index = index if index is not None else PrefixIndex()
        # Scorers with the same hashing parameters share one cycle entry (hash and match once per request).
        self._state_key = f"prefix_state:{block_size}:{max_blocks}:{id(self.index)}"

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "PrefixCacheScorer":
        check_keys(
            params,
            ("blockSize", "hashBlockSize", "maxPrefixBlocksToMatch", "lruCapacityPerServer", "autoTune", "matchLengthWeight",
             "matchLengthScaleTokens", "boundedLoadFactor", "boundedLoadSlack"),
        )
        if "blockSize" in params and "hashBlockSize" in params:
            raise ValueError("give 'blockSize' or its alias 'hashBlockSize', not both")
        bs_key = "hashBlockSize" if "hashBlockSize" in params else "blockSize"
        block_size = get_int(params, bs_key, DEFAULT_BLOCK_SIZE, minimum=1)
        max_blocks = get_int(params, "maxPrefixBlocksToMatch", DEFAULT_MAX_PREFIX_BLOCKS, minimum=1)
        capacity = get_int(params, "lruCapacityPerServer", DEFAULT_LRU_CAPACITY_PER_SERVER, minimum=1)
        auto_tune = get_bool(params, "autoTune", False)
        inst = cls(
            name,
            shared_index(ctx, capacity),
            block_size,
            max_blocks,
            auto_tune,
            get_float(params, "matchLengthWeight", 0.0, minimum=0.0, maximum=1.0),
            get_int(params, "matchLengthScaleTokens", 8192, minimum=1),
            get_float(params, "boundedLoadFactor", 0.0, minimum=0.0),
            get_float(params, "boundedLoadSlack", DEFAULT_LOAD_SLACK, minimum=0.0),
        )
        ctx.services.setdefault(SCORER_SERVICE_KEY, inst)  # the config's first prefix scorer (prefix-cache-affinity-filter reads it)
        return inst

    def _state(self, cycle: CycleState, request: InferenceRequest) -> tuple[list[int], dict[str, int]]:
        st = cycle.data.get(self._state_key)
        if st is None:
            hashes = hash_prompt(request.prompt_text, request.target_model, self.block_size, self.max_blocks)
            st = (hashes, self.index.match(hashes))
            cycle.data[self._state_key] = st
        return st  # type: ignore[no-any-return]

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        hashes, matched = self._state(cycle, request)
        total = len(hashes)
        data = cycle.data
        data[CYCLE_TOTAL] = total
        data[CYCLE_BLOCK_SIZE] = self.block_size
        if not matched:
            zeros = [0.0] * len(candidates)
            data[CYCLE_SCORES] = dict.fromkeys([e.address for e in candidates], 0.0)
            data[CYCLE_MATCHED] = {}
            data[PREFIX_CACHED_TOKENS] = {}
            return zeros
        inv = 1.0 / total
        get = matched.get
        scores = [get(e.address, 0) * inv for e in candidates]
        w = self.length_weight
        if w:  # the reference's match-length term: w · min(1, matched tokens / scale)² + (1 − w) · ratio
            k = self.block_size / CHARS_PER_TOKEN / self.length_scale
            scores = [w * min(1.0, get(e.address, 0) * k) ** 2 + (1.0 - w) * r for e, r in zip(candidates, scores)]
        data[CYCLE_SCORES] = {e.address: s for e, s in zip(candidates, scores)}
        data[CYCLE_MATCHED] = matched
        tok = self.block_size / CHARS_PER_TOKEN
        data[PREFIX_CACHED_TOKENS] = {a: int(b * tok) for a, b in matched.items()}
        # the cycle keeps the true cache state (predictor features, affinity gates); only the score is bounded
        return bounded_load(scores, candidates, self.load_factor, self.load_slack)

    def _capacity_for(self, ep: Endpoint) -> int:
        m = ep.metrics
        if m.num_gpu_blocks > 0 and m.block_size > 0:
            return max(1, m.num_gpu_blocks * m.block_size * CHARS_PER_TOKEN // self.block_size)
        return 0

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        target = result.primary
        hashes, matched = self._state(cycle, request)
        self.index.record(matched.get(target.address, 0) if hashes else 0)
        if not hashes or target.removed:
            return
        # every pod the request goes to holds its prefix afterwards: the primary, and in P/D also the prefill pod
        for _profile, ep in result.endpoints():
            if ep.removed:
                continue
            if self.auto_tune:
                cap = self._capacity_for(ep)
                if cap:
                    self.index.set_capacity(ep.address, cap)
            self.index.add(hashes, ep.address)
