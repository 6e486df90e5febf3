"""Token-block index fed by vLLM KV events: which pods hold which prompt blocks, in which tier and group.

Keys are OURS, not the engine's. vLLM's block hashes are seeded per process (and since 0.10 are SHA-256
bytes), so the scheduler cannot reproduce them from a prompt. Like llm-d-kv-cache-manager
(``pkg/kvcache/kvblock/token_processor.go``: chained hash over ``(parent, block tokens, extra)``), we hash
the ``token_ids`` a ``BlockStored`` event carries into our own chained key and remember, per pod, which engine
hash became which key (``BlockRemoved`` carries only engine hashes). A request is keyed the same way from
its own token ids, so a lookup is a walk over the request's keys.

Key of block *i* = ``xxh64(uint32 token ids of block i [+ b"\\x00lora:" + lora name], seed=key of block i-1)``,
with block -1's key = ``xxh64(b"extproc-kv-root:" + hash_seed)``. Chaining through the xxh64 seed costs one
hash call per block and no concatenation.

Tiers: every (medium, KV-cache group) pair a pod reports gets a bit; a pod's entry for a key is a bitmask of
the tiers holding the block. Groups (hybrid models) are scored as ``docs/precise-prefix.md`` describes:

* ``full_attention`` / ``mla_attention`` (and any kind we do not know): block *i* is reusable only if blocks
  0..i are all present in every such group → a consecutive-prefix walk;
* ``sliding_window`` / ``sliding_window_mla`` with window *W* tokens: a hit of length *L* blocks needs only
  the last ``ceil((W - 1) / block_size)`` blocks before *L* in that group;
* ``mamba``: the recurrent state is only reusable at a checkpoint, so a hit of length *L* needs block *L-1*
  present in that group.

The hit length of a pod is the largest *L* that satisfies all of its groups (*L* = 0 always does), which is
how vLLM's hybrid KV-cache coordinator decides the cache hit. A pod's groups are learnt from its
``BlockStored`` events; a pod with no events yet has no groups and only speculative entries can match.

Memory: an LRU over keys (``max_keys``); evicting a key drops it for every pod together with the engine-hash
mapping that led to it. Per-pod state is a dict key → engine hash and its inverse, so removing a pod costs
O(that pod's keys).

Speculative entries: when the scheduler dispatches a request it may insert the request's keys for the
chosen pod with a TTL (the engine will store them shortly); a ``BlockStored`` for the same key and pod
confirms (replaces) them; expired ones are swept lazily. They count as GPU hits in every group.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

from extproc.datalayer.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from extproc.services import ServiceKey

log = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
FULL_KINDS = frozenset({"full_attention", "mla_attention"})
SLIDING_KINDS = frozenset({"sliding_window", "sliding_window_mla"})
MAMBA_KINDS = frozenset({"mamba"})
_MAX_MEDIA = 8  # bits per group in a tier mask
_U32_MAX = 0xFFFFFFFF


def root_key(hash_seed: str = "") -> int:
    return xxhash.xxh64_intdigest(b"extproc-kv-root:" + hash_seed.encode())


def block_keys(
    token_ids: Sequence[int] | array,
    block_size: int,
    *,
    parent: int | None = None,
    lora: str | None = None,
    hash_seed: str = "",
    limit: int | None = None,
) -> list[int]:
    """Our chained keys of the FULL blocks of ``token_ids`` (a trailing partial block is never cached)."""
    if block_size <= 0:
        raise ValueError("block_size must be > 0")
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        arr = token_ids
    else:
        try:
            arr = array("I", token_ids)
        except OverflowError:  # a token id outside uint32: hash it as 64-bit
            arr = array("Q", [t & 0xFFFFFFFFFFFFFFFF for t in token_ids])
    n = len(arr) // block_size
    if limit is not None:
        n = min(n, limit)
    mv = memoryview(arr).cast("B")
    step = block_size * arr.itemsize
    h = root_key(hash_seed) if parent is None else parent
    out = [0] * n
    digest = xxhash.xxh64_intdigest
    if lora:
        suffix = b"\x00lora:" + lora.encode()
        for i in range(n):
            h = digest(bytes(mv[i * step : (i + 1) * step]) + suffix, h)
            out[i] = h
    else:
        for i in range(n):
            h = digest(mv[i * step : (i + 1) * step], h)
            out[i] = h
    return out


@dataclass(slots=True)
class GroupInfo:
    """A KV-cache group as a pod reported it (``group_idx``, ``kv_cache_spec_kind``)."""

    kind: str = "full_attention"
    sliding_window: int | None = None  # tokens, for sliding-window groups
    block_size: int = 0


@dataclass(slots=True)
class _PodState:
    key_to_engine: dict[int, int] = field(default_factory=dict)
    engine_to_key: dict[int, int] = field(default_factory=dict)
    groups: dict[int, GroupInfo] = field(default_factory=dict)
    block_size: int = 0
    spec_keys: set[int] = field(default_factory=set)


@dataclass(slots=True)
class PrefixMatch:
    """Matched leading blocks for one pod: in any medium, and in GPU memory only."""

    blocks: int = 0
    gpu_blocks: int = 0


@dataclass(slots=True)
class IndexStats:
    keys: int = 0
    pods: int = 0
    stored_blocks: int = 0
    removed_blocks: int = 0
    unknown_removals: int = 0
    orphan_blocks: int = 0  # BlockStored whose parent engine hash we never saw (missed or evicted)
    evicted_keys: int = 0
    speculative_inserts: int = 0
    speculative_confirmed: int = 0
    speculative_expired: int = 0
    holds: int = 0
    holds_released: int = 0
    holds_expired: int = 0
    clears: int = 0


# the KV-block index of a config, shared by its precise-prefix scorers
KV_INDEX: ServiceKey[KVBlockIndex] = ServiceKey("kv_index")


class KVBlockIndex:
    """Key → {pod address → tier bitmask}, with LRU over keys and speculative entries. Not thread-safe: one
    event loop owns it (subscribers write from their tasks, the scorer reads on the decision path)."""

    def __init__(
        self,
        max_keys: int = 1_000_000,
        *,
        hash_seed: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self.hash_seed = hash_seed
        self._root = root_key(hash_seed)
        self._clock = clock
        self._blocks: OrderedDict[int, dict[str, int]] = OrderedDict()
        self._pods: dict[str, _PodState] = {}
        self._media: dict[str, int] = {MEDIUM_GPU: 0}
        # Speculative entries: key → {pod: expiry}; a heap of (expiry, key, pod) for the lazy sweep.
        self._spec: dict[int, dict[str, float]] = {}
        self._spec_heap: list[tuple[float, int, str]] = []
        # In-flight holds: hold id → (pod, keys, expiry); key → {pod: number of live holds}; expiry heap.
        self._holds: dict[str, tuple[str, list[int], float]] = {}
        # told of every local hold / release / speculative insert (the replication layer shares them with the
        # other scheduler replicas, server/replication.py); inserts from a peer pass notify=False
        self.on_hold: Callable[[str, str, list[int], float], None] | None = None
        self.on_release: Callable[[str], None] | None = None
        self.on_speculative: Callable[[str, list[int], float], None] | None = None
        self._held: dict[int, dict[str, int]] = {}
        self._hold_heap: list[tuple[float, str]] = []
        self.stats = IndexStats()

    @property
    def clock(self) -> Callable[[], float]:
        """The clock speculative TTLs run on (``time.monotonic`` unless a virtual-time driver sets its own)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    # ---------------------------------------------------------------- keys
    def keys_for(self, token_ids: Sequence[int] | array, block_size: int, lora: str | None = None) -> list[int]:
        return block_keys(token_ids, block_size, lora=lora, hash_seed=self.hash_seed)

    def block_size_of(self, address: str) -> int:
        """Block size learnt from the pod's events (0 = none seen)."""
        st = self._pods.get(address)
        return st.block_size if st is not None else 0

    def groups_of(self, address: str) -> dict[int, GroupInfo]:
        st = self._pods.get(address)
        return dict(st.groups) if st is not None else {}

    def pods(self) -> list[str]:
        return list(self._pods)

    def __len__(self) -> int:
        return len(self._blocks)

    def _bit(self, medium: str | None, group_idx: int) -> int:
        m = (medium or MEDIUM_GPU).upper()
        mi = self._media.get(m)
        if mi is None:
            if len(self._media) >= _MAX_MEDIA:
                mi = _MAX_MEDIA - 1  # fold exotic tiers together rather than grow without bound
            else:
                mi = len(self._media)
                self._media[m] = mi
        return 1 << (group_idx * _MAX_MEDIA + mi)

    def _group_mask(self, group_idx: int, gpu_only: bool) -> int:
        if gpu_only:
            return 1 << (group_idx * _MAX_MEDIA)
        return ((1 << _MAX_MEDIA) - 1) << (group_idx * _MAX_MEDIA)

    # ---------------------------------------------------------------- events
    def apply(self, address: str, events: Iterable[KVEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self._stored(address, ev)
            elif isinstance(ev, BlockRemoved):
                self._removed(address, ev)
            elif isinstance(ev, AllBlocksCleared):
                self.stats.clears += 1
                self.drop_pod(address, keep_groups=True)

    def _state(self, address: str) -> _PodState:
        st = self._pods.get(address)
        if st is None:
            st = _PodState()
            self._pods[address] = st
        return st

    def _stored(self, address: str, ev: BlockStored) -> None:
        st = self._state(address)
        bs = ev.block_size
        if bs <= 0:
            bs = len(ev.token_ids) // len(ev.block_hashes) if ev.block_hashes else 0
        if bs <= 0:
            return
        g = st.groups.get(ev.group_idx)
        if g is None or g.kind != ev.kv_cache_spec_kind or g.block_size != bs:
            st.groups[ev.group_idx] = GroupInfo(ev.kv_cache_spec_kind, ev.kv_cache_spec_sliding_window, bs)
        if ev.group_idx == 0 or st.block_size == 0:
            st.block_size = bs
        if ev.parent_block_hash is None:
            parent = self._root
        else:
            p = st.engine_to_key.get(ev.parent_block_hash)
            if p is None:
                self.stats.orphan_blocks += len(ev.block_hashes)
                return
            parent = p
        keys = block_keys(ev.token_ids, bs, parent=parent, lora=ev.lora_key, limit=len(ev.block_hashes))
        bit = self._bit(ev.medium, ev.group_idx)
        blocks = self._blocks
        spec = self._spec
        for eh, key in zip(ev.block_hashes, keys):
            entry = blocks.get(key)
            if entry is None:
                blocks[key] = {address: bit}
            else:
                entry[address] = entry.get(address, 0) | bit
                blocks.move_to_end(key)
            old = st.key_to_engine.get(key)
            if old is not None and old != eh:
                st.engine_to_key.pop(old, None)
            st.key_to_engine[key] = eh
            st.engine_to_key[eh] = key
            sp = spec.get(key)
            if sp is not None and sp.pop(address, None) is not None:
                self.stats.speculative_confirmed += 1
                st.spec_keys.discard(key)
                if not sp:
                    del spec[key]
        self.stats.stored_blocks += len(keys)
        while len(blocks) > self.max_keys:
            self._evict_oldest()

    def _removed(self, address: str, ev: BlockRemoved) -> None:
        st = self._pods.get(address)
        if st is None:
            self.stats.unknown_removals += len(ev.block_hashes)
            return
        bit = self._bit(ev.medium, ev.group_idx)
        for eh in ev.block_hashes:
            key = st.engine_to_key.get(eh)
            if key is None:
                self.stats.unknown_removals += 1
                continue
            entry = self._blocks.get(key)
            mask = entry.get(address, 0) if entry is not None else 0
            mask &= ~bit
            self.stats.removed_blocks += 1
            if mask:
                entry[address] = mask  # type: ignore[index]  # mask != 0 implies entry is not None
                continue
            del st.engine_to_key[eh]
            st.key_to_engine.pop(key, None)
            if entry is not None:
                entry.pop(address, None)
                if not entry:
                    del self._blocks[key]

    def _evict_oldest(self) -> None:
        key, entry = self._blocks.popitem(last=False)
        self.stats.evicted_keys += 1
        for addr in entry:
            st = self._pods.get(addr)
            if st is not None:
                eh = st.key_to_engine.pop(key, None)
                if eh is not None:
                    st.engine_to_key.pop(eh, None)

    def drop_pod(self, address: str, *, keep_groups: bool = False) -> int:
        """Forget everything a pod holds (pod left, resync after a gap, AllBlocksCleared). Returns the number
        of keys dropped. O(the pod's keys)."""
        st = self._pods.get(address)
        if st is None:
            return 0
        blocks = self._blocks
        n = 0
        for key in st.key_to_engine:
            entry = blocks.get(key)
            if entry is not None and entry.pop(address, None) is not None:
                n += 1
                if not entry:
                    del blocks[key]
        for key in st.spec_keys:
            sp = self._spec.get(key)
            if sp is not None:
                sp.pop(address, None)
                if not sp:
                    del self._spec[key]
        for hid in [h for h, (a, _, _) in self._holds.items() if a == address]:
            self._release(hid)
        if keep_groups:
            self._pods[address] = _PodState(groups=st.groups, block_size=st.block_size)
        else:
            del self._pods[address]
        return n

    # ---------------------------------------------------------------- speculative entries
    def add_speculative(self, address: str, keys: Sequence[int], ttl_s: float, notify: bool = True) -> None:
        """The request with ``keys`` was just dispatched to ``address``: count its blocks as held there for
        ``ttl_s`` seconds unless a BlockStored confirms them first."""
        if ttl_s <= 0 or not keys:
            return
        now = self._clock()
        self._sweep(now)
        exp = now + ttl_s
        st = self._state(address)
        blocks = self._blocks
        for key in keys:
            entry = blocks.get(key)
            if entry is not None and entry.get(address, 0) & self._group_mask(0, True):
                continue  # already confirmed on GPU
            sp = self._spec.get(key)
            if sp is None:
                sp = self._spec[key] = {}
            sp[address] = exp
            st.spec_keys.add(key)
            heapq.heappush(self._spec_heap, (exp, key, address))
        self.stats.speculative_inserts += len(keys)
        cb = self.on_speculative
        if notify and cb is not None:
            cb(address, list(keys), ttl_s)
        # The heap holds one item per insert; compact it if refreshed entries left it much larger than live.
        if len(self._spec_heap) > 4 * max(1024, sum(len(v) for v in self._spec.values())):
            self._spec_heap = [(e, k, a) for k, d in self._spec.items() for a, e in d.items()]
            heapq.heapify(self._spec_heap)

    def _sweep(self, now: float) -> None:
        hheap = self._hold_heap
        while hheap and hheap[0][0] <= now:
            exp, hid = heapq.heappop(hheap)
            h = self._holds.get(hid)
            if h is not None and h[2] == exp:
                self._release(hid)
                self.stats.holds_expired += 1
        heap = self._spec_heap
        spec = self._spec
        while heap and heap[0][0] <= now:
            exp, key, addr = heapq.heappop(heap)
            sp = spec.get(key)
            if sp is None:
                continue
            cur = sp.get(addr)
            if cur is None or cur > now:
                continue  # confirmed, dropped, or refreshed with a later expiry
            del sp[addr]
            self.stats.speculative_expired += 1
            st = self._pods.get(addr)
            if st is not None:
                st.spec_keys.discard(key)
            if not sp:
                del spec[key]

    # ---------------------------------------------------------------- in-flight holds
    def hold(self, hold_id: str, address: str, keys: Sequence[int], max_s: float, notify: bool = True) -> None:
        """Request ``hold_id`` with ``keys`` was dispatched to ``address``: its blocks count as held there until
        :meth:`release` (the request completed) or ``max_s`` seconds pass (a completion that never came).

        A queued request's blocks will be computed (or found) when the pod admits it, and a running request's
        blocks are pinned (reference count > 0) so the engine cannot evict them; so while the request is in
        flight, a later request with the same prefix sent to that pod will find it cached by the time it is
        admitted (FCFS). Re-holding an id replaces its previous hold."""
        if not keys or max_s <= 0:
            return
        now = self._clock()
        self._sweep(now)
        if hold_id in self._holds:
            self._release(hold_id)
        exp = now + max_s
        kl = list(keys)
        self._holds[hold_id] = (address, kl, exp)
        held = self._held
        for key in kl:
            d = held.get(key)
            if d is None:
                held[key] = {address: 1}
            else:
                d[address] = d.get(address, 0) + 1
        heapq.heappush(self._hold_heap, (exp, hold_id))
        self._state(address)
        self.stats.holds += 1
        cb = self.on_hold
        if notify and cb is not None:
            cb(hold_id, address, kl, max_s)

    def release(self, hold_id: str, notify: bool = True) -> bool:
        """The request behind ``hold_id`` finished: drop its hold. True if it was live."""
        if self._release(hold_id):
            self.stats.holds_released += 1
            cb = self.on_release
            if notify and cb is not None:
                cb(hold_id)
            return True
        return False

    def _release(self, hold_id: str) -> bool:
        h = self._holds.pop(hold_id, None)
        if h is None:
            return False
        address, keys, _ = h
        held = self._held
        for key in keys:
            d = held.get(key)
            if d is None:
                continue
            c = d.get(address, 0) - 1
            if c > 0:
                d[address] = c
            else:
                d.pop(address, None)
                if not d:
                    del held[key]
        return True

    def holds_of(self, address: str) -> int:
        """Live in-flight holds on ``address``."""
        self._sweep(self._clock())
        return sum(1 for a, _, _ in self._holds.values() if a == address)

    def speculative_count(self, address: str) -> int:
        self._sweep(self._clock())
        st = self._pods.get(address)
        return len(st.spec_keys) if st is not None else 0

    # ---------------------------------------------------------------- lookup
    def lookup(self, keys: Sequence[int], pods: Iterable[str]) -> dict[str, int]:
        """Matched leading blocks (any medium) per pod, for the request's ``keys``."""
        return {a: m.blocks for a, m in self.match(keys, pods).items()}

    def match(self, keys: Sequence[int], pods: Iterable[str]) -> dict[str, PrefixMatch]:
        """Per pod: how many leading blocks of ``keys`` it can serve from cache (see the module docstring for
        the hybrid-group rules), in any medium and in GPU memory only. Touches matched keys in the LRU."""
        pod_list = list(pods)
        out = {a: PrefixMatch() for a in pod_list}
        if not keys or not pod_list:
            return out
        now = self._clock()
        self._sweep(now)
        blocks = self._blocks
        spec = self._spec
        held = self._held
        states = self._pods
        n = len(keys)
        # Full-attention requirements per pod: (mask of one group, ...) for the any/gpu walks.
        simple: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        hybrid: list[str] = []
        for a in pod_list:
            st = states.get(a)
            if st is None:
                continue  # nothing learnt and nothing speculative for this pod
            full = [gi for gi, g in st.groups.items() if g.kind not in SLIDING_KINDS and g.kind not in MAMBA_KINDS]
            if len(full) != len(st.groups):
                hybrid.append(a)
            if not full and st.groups:
                full_any: tuple[int, ...] = ()
                full_gpu: tuple[int, ...] = ()
            else:
                gids = full or [0]
                full_any = tuple(self._group_mask(g, False) for g in gids)
                full_gpu = tuple(self._group_mask(g, True) for g in gids)
            simple[a] = (full_any, full_gpu)
        # Walk 1: the consecutive prefix present in every full-attention group (or speculative).
        any_alive = dict(simple)
        gpu_alive = set(simple)
        for i in range(n):
            if not any_alive:
                break
            k = keys[i]
            entry = blocks.get(k)
            sp = spec.get(k)
            hd = held.get(k)
            touched = False
            for a in list(any_alive):
                if (sp is not None and a in sp) or (hd is not None and a in hd):
                    out[a].blocks = i + 1
                    if a in gpu_alive:
                        out[a].gpu_blocks = i + 1
                    touched = True
                    continue
                mask = entry.get(a, 0) if entry is not None else 0
                full_any, full_gpu = any_alive[a]
                if not full_any:
                    if a in hybrid:  # no full-attention group: the hybrid pass bounds it
                        out[a].blocks = i + 1
                        out[a].gpu_blocks = i + 1
                        continue
                    del any_alive[a]
                    gpu_alive.discard(a)
                    continue
                if all(mask & gm for gm in full_any):
                    out[a].blocks = i + 1
                    touched = True
                    if a in gpu_alive:
                        if all(mask & gm for gm in full_gpu):
                            out[a].gpu_blocks = i + 1
                        else:
                            gpu_alive.discard(a)
                else:
                    del any_alive[a]
                    gpu_alive.discard(a)
            if touched and entry is not None:
                blocks.move_to_end(k)
        # Pass 2 for pods with sliding-window / mamba groups: shrink the hit to what those groups allow.
        for a in hybrid:
            st = states[a]
            m = out[a]
            m.blocks = self._hybrid_limit(a, st, keys, m.blocks, gpu_only=False)
            m.gpu_blocks = min(m.blocks, self._hybrid_limit(a, st, keys, m.gpu_blocks, gpu_only=True))
        return out

    def _hybrid_limit(self, address: str, st: _PodState, keys: Sequence[int], upper: int, *, gpu_only: bool) -> int:
        if upper <= 0:
            return 0
        blocks = self._blocks
        spec = self._spec
        held = self._held

        def present(gi: int) -> list[bool]:
            gm = self._group_mask(gi, gpu_only)
            res = [False] * upper
            for i in range(upper):
                k = keys[i]
                sp = spec.get(k)
                hd = held.get(k)
                if (sp is not None and address in sp) or (hd is not None and address in hd):
                    res[i] = True
                    continue
                e = blocks.get(k)
                res[i] = e is not None and bool(e.get(address, 0) & gm)
            return res

        checks: list[Callable[[int], bool]] = []
        for gi, g in st.groups.items():
            if g.kind in SLIDING_KINDS:
                bs = g.block_size or st.block_size or 1
                # vLLM's SlidingWindowManager: cdiv(window - 1, block_size) blocks before the hit's end (the
                # token after the hit is inside its own window)
                w = max(1, math.ceil(((g.sliding_window or bs) - 1) / bs))
                pres = present(gi)
                prefix = [0] * (upper + 1)
                for i, p in enumerate(pres):
                    prefix[i + 1] = prefix[i] + (1 if p else 0)

                def sw_ok(L: int, prefix: list[int] = prefix, w: int = w) -> bool:
                    lo = max(0, L - w)
                    return prefix[L] - prefix[lo] == L - lo

                checks.append(sw_ok)
            elif g.kind in MAMBA_KINDS:
                pres_m = present(gi)
                checks.append(lambda L, pres_m=pres_m: pres_m[L - 1])
        for L in range(upper, 0, -1):
            if all(c(L) for c in checks):
                return L
        return 0

    # ---------------------------------------------------------------- direct inserts (approximate index)
    def insert(self, address: str, keys: Sequence[int]) -> None:
        """Record ``keys`` as held on GPU group 0 by ``address`` without an engine hash (used for the
        approximate character-block fallback, where the scheduler's own dispatches are the only signal)."""
        st = self._state(address)
        bit = self._group_mask(0, True)
        blocks = self._blocks
        for key in keys:
            entry = blocks.get(key)
            if entry is None:
                blocks[key] = {address: bit}
            else:
                entry[address] = entry.get(address, 0) | bit
                blocks.move_to_end(key)
            # A synthetic engine hash (the key itself) keeps drop_pod/eviction bookkeeping uniform.
            st.key_to_engine[key] = key
            st.engine_to_key[key] = key
        while len(blocks) > self.max_keys:
            self._evict_oldest()

    def snapshot_stats(self) -> dict[str, int]:
        s = self.stats
        s.keys = len(self._blocks)
        s.pods = len(self._pods)
        return {k: getattr(s, k) for k in s.__dataclass_fields__}
