"""Multimodal embeddings-cache affinity: prefer pods that recently encoded the same image / video / audio item.

Reference: llm-d-router pkg/epp/framework/plugins/{requestcontrol/dataproducer/multimodal,
scheduling/scorer/mmcacheaffinity}.

- ``mm-embeddings-cache-producer``: hashes each multimodal item of a chat request (content blocks ``image_url``,
  ``video_url``, ``input_audio``: xxh64 of the block's payload, so the same URL or data URI is the same item;
  repeats within a request count once) and keeps, per pod, an LRU of the items it was sent (on dispatch: the
  primary pod and the pods of an ``encode`` profile result). ``cacheSizeInMBPerServer`` (4096) / 2 MiB per item =
  entries per pod (2048), as the reference assumes. The reference's own sample writes ``cacheSizeInMB``, which its
  strict decoder rejects; it is accepted here as an alias, with a warning.
- ``mm-embeddings-cache-scorer``: score = items of the request the pod holds / items of the request (0 without
  items or without a producer). Reads the config's producer; computed once per cycle.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import xxhash

from extproc.plugin import (
    CycleKey,
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginContext,
    SchedulingResult,
    check_keys,
    get_int,
    register,
)

log = logging.getLogger(__name__)

SERVICE_KEY = "mm_embeddings_cache"
ITEM_BYTES_MB = 2  # assumed MiB per tracked item (the reference's fixed divisor)
_ITEMS: CycleKey[tuple[int, ...]] = CycleKey("mm_items")
_PAYLOAD_KEYS = {"image_url": "image_url", "video_url": "video_url", "input_audio": "input_audio"}


def multimodal_items(body: Mapping[str, Any]) -> tuple[int, ...]:
    """Unique item hashes of a chat request's multimodal content blocks, in first-seen order."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ()
    seen: dict[int, None] = {}
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, Mapping):
                continue
            key = _PAYLOAD_KEYS.get(block.get("type"))  # type: ignore[arg-type]
            if key is None:
                continue
            payload = block.get(key)
            if isinstance(payload, Mapping) and "url" in payload:
                payload = payload["url"]
            raw = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, separators=(",", ":"))
            seen[xxhash.xxh64_intdigest(f"{key}\0{raw}".encode())] = None
    return tuple(seen)


@register
class MMEmbeddingsCacheProducer:
    type_name: ClassVar[str] = "mm-embeddings-cache-producer"
    __slots__ = ("name", "entries_per_pod", "_lru")

    def __init__(self, name: str = "mm-embeddings-cache-producer", entries_per_pod: int = 2048) -> None:
        self.name = name
        self.entries_per_pod = entries_per_pod
        self._lru: dict[str, OrderedDict[int, None]] = {}

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "MMEmbeddingsCacheProducer":
        check_keys(params, ("cacheSizeInMBPerServer", "cacheSizeInMB"))
        if "cacheSizeInMB" in params and "cacheSizeInMBPerServer" in params:
            raise ValueError("give 'cacheSizeInMBPerServer' or its alias 'cacheSizeInMB', not both")
        key = "cacheSizeInMB" if "cacheSizeInMB" in params else "cacheSizeInMBPerServer"
        if key == "cacheSizeInMB":
            log.warning("parameter 'cacheSizeInMB' read as 'cacheSizeInMBPerServer' (the reference's name)", extra={"plugin": name})
        mb = get_int(params, key, 4096)
        if mb <= 0:
            mb = 4096  # the reference falls back to the default for values <= 0
        inst = cls(name, max(1, mb // ITEM_BYTES_MB))
        ctx.services.setdefault(SERVICE_KEY, inst)
        ctx.pool.add_listener(inst._on_pool_change)
        return inst

    def _on_pool_change(self, added: list[Endpoint], removed: list[Endpoint]) -> None:
        for e in removed:
            self._lru.pop(e.address, None)

    def items(self, cycle: CycleState, request: InferenceRequest) -> tuple[int, ...]:
        items = cycle.get(_ITEMS)
        if items is None:
            items = multimodal_items(request.body)
            cycle.set(_ITEMS, items)
        return items

    def matched(self, address: str, items: Sequence[int]) -> int:
        lru = self._lru.get(address)
        return sum(1 for h in items if h in lru) if lru else 0

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        items = self.items(cycle, request)
        if not items:
            return
        targets = [result.primary]
        enc = result.profile_results.get("encode")
        if enc is not None and result.primary_profile != "encode":
            targets += enc.targets
        for e in targets:
            lru = self._lru.get(e.address)
            if lru is None:
                lru = self._lru[e.address] = OrderedDict()
            for h in items:
                lru.pop(h, None)
                lru[h] = None
            while len(lru) > self.entries_per_pod:
                lru.popitem(last=False)


@register
class MMEmbeddingsCacheScorer:
    type_name: ClassVar[str] = "mm-embeddings-cache-scorer"
    __slots__ = ("name", "_services")

    def __init__(self, name: str = "mm-embeddings-cache-scorer", services: dict[str, Any] | None = None) -> None:
        self.name = name
        self._services = services if services is not None else {}

    @classmethod
    def from_config(cls, name: str, params: Mapping[str, Any], ctx: PluginContext) -> "MMEmbeddingsCacheScorer":
        check_keys(params, ())
        return cls(name, ctx.services)

    def score(self, cycle: CycleState, request: InferenceRequest, candidates: Sequence[Endpoint]) -> list[float]:
        producer: MMEmbeddingsCacheProducer | None = self._services.get(SERVICE_KEY)
        if producer is None:
            return [0.0] * len(candidates)
        items = producer.items(cycle, request)
        if not items:
            return [0.0] * len(candidates)
        n = float(len(items))
        return [producer.matched(e.address, items) / n for e in candidates]
