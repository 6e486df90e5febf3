"""KV events in the virtual-time bench: the index runs on virtual time and mirrors the engines' caches."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.bench import virtual
from extproc.bench.setups import SETUPS
from extproc.bench.workloads import Stage, generate
from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvindex import KVBlockIndex
from extproc.scheduling.config import load_config
from extproc.sim.kvcache import KVCache


def test_feed_sets_virtual_clock_and_applies_engine_events() -> None:
    cfg = load_config("precise-prefix", EndpointPool())
    now = [1000.0]
    feed = virtual._feed_kv_events(cfg.plugins, lambda: now[0])
    assert feed is not None
    index = cfg.plugins["precise-prefix-cache"].index
    assert index.clock() == 1000.0  # speculative TTLs / holds run on the caller's (virtual) time
    kv = KVCache(8, 4, hash_seed=7)
    hashes: list[int] = []
    tokens = list(range(100, 112))
    kv.extend_hashes(hashes, tokens, None)
    blocks = kv.allocate(3)
    assert blocks is not None
    kv.cache_blocks(blocks, hashes, 0, 3, tokens, None, None)
    feed("p", kv.take_events())
    keys = index.keys_for(tokens, 4)
    assert index.lookup(keys, ["p"]) == {"p": 3}
    kv.free(blocks)
    assert kv.allocate(8) is not None  # evicts all three cached blocks
    feed("p", kv.take_events())
    assert index.lookup(keys, ["p"]) == {"p": 0}


@pytest.fixture()
def captured_index(monkeypatch: pytest.MonkeyPatch) -> list[KVBlockIndex]:
    seen: list[KVBlockIndex] = []
    real = virtual._feed_kv_events

    def spy(plugins: dict[str, Any], clock: Any) -> Any:
        out = real(plugins, clock)
        seen.extend(p.index for p in plugins.values() if isinstance(getattr(p, "index", None), KVBlockIndex))
        return out

    monkeypatch.setattr(virtual, "_feed_kv_events", spy)
    return seen


def test_index_mirrors_engine_caches_after_a_run(captured_index: list[KVBlockIndex], monkeypatch: pytest.MonkeyPatch) -> None:
    engines: list[Any] = []
    from extproc.sim import engine as engine_mod

    real_init = engine_mod.Engine.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        engines.append(self)

    monkeypatch.setattr(engine_mod.Engine, "__init__", init)
    wl = generate("shared-prefix", [Stage(30.0, 3.0)], seed=0)
    fl = virtual.layout("3", kv_blocks=300)  # small caches: many evictions
    res = virtual.run_virtual(wl, SETUPS["extproc-precise"], fl, seed=0)
    assert len(res.results) == len(wl.requests) and all(r.ok for r in res.results)
    (index,) = captured_index
    assert index.stats.removed_blocks > 0
    for (_, addr), eng in zip(fl.pods, engines):
        st = index._pods[addr]
        mapped, cached = set(st.engine_to_key), set(eng.kv._cached)
        assert mapped <= cached  # every eviction applied: nothing stale, per pod
        # every store applied, except blocks chained on a parent the engine itself never announced (orphans)
        assert len(cached - mapped) <= index.stats.orphan_blocks
    # every dispatched request held its prefix until it completed, then released it
    assert index.stats.holds == len(wl.requests) == index.stats.holds_released
    assert index.clock() == pytest.approx(res.virtual_seconds)
