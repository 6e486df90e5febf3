"""CPU KV-offload tier: write-through copies, load on a GPU miss at a transfer cost, medium CPU KV events."""

from __future__ import annotations

import msgpack

from extproc.datalayer.endpoint import EndpointPool
from extproc.datalayer.kvevents import decode_payload
from extproc.scheduling.config import load_config
from extproc.sim.engine import Engine, SimRequest
from extproc.sim.kvcache import BlockRemoved, BlockStored
from extproc.sim.kvevents import encode_batch, encode_event
from extproc.sim.profiles import PROFILES

BASE = PROFILES["llama3-8b-h100"].replace(num_gpu_blocks=24, block_size=16, max_num_seqs=4, max_num_batched_tokens=4096)


def _run(eng: Engine, rid: str, prompt: list[int], now: float) -> tuple[float, list, int, float]:
    eng.add_request(SimRequest(rid, prompt, 2, arrival=now))
    events = []
    first = eng.step(now)
    events += first.kv_events
    prefill = first.num_prefill_tokens
    now += first.duration_s
    while eng.has_work():
        r = eng.step(now)
        events += r.kv_events
        now += r.duration_s
    return now, events, prefill, first.duration_s


def test_evicted_blocks_come_back_from_cpu_at_transfer_cost() -> None:
    prof = BASE.replace(cpu_offload_blocks=64, cpu_load_ms_per_block=0.5)
    eng = Engine(prof)
    a = list(range(1, 161))  # 10 full blocks
    now, ev, prefill, _ = _run(eng, "a1", a, 0.0)
    assert prefill == 160
    cpu_stored = [e for e in ev if isinstance(e, BlockStored) and e.medium == "CPU"]
    gpu_stored = [e for e in ev if isinstance(e, BlockStored) and e.medium == "GPU"]
    assert sum(len(e.block_hashes) for e in cpu_stored) == sum(len(e.block_hashes) for e in gpu_stored) == 10
    # other prompts evict every GPU block of ``a``
    for i in range(3):
        now, ev, _, _ = _run(eng, f"b{i}", list(range(1000 * (i + 1), 1000 * (i + 1) + 300)), now)
    assert eng.cached_prefix_tokens(a) == 0
    assert any(isinstance(e, BlockRemoved) and e.medium == "GPU" for e in ev)
    # the same prompt again: its first 9 blocks load from CPU (the last token is always recomputed)
    now, ev, prefill, dur = _run(eng, "a2", a, now)
    assert prefill == 160 - 9 * 16
    assert eng.cpu_tier is not None and eng.cpu_tier.blocks_loaded == 9
    # the load cost is on the admitting step: same step without the tier = recompute of 144 more tokens
    plain = Engine(BASE)
    _run(plain, "a1", a, 0.0)
    for i in range(3):
        _run(plain, f"b{i}", list(range(1000 * (i + 1), 1000 * (i + 1) + 300)), 1.0)
    _, _, prefill_plain, dur_plain = _run(plain, "a2", a, 2.0)
    assert prefill_plain == 160
    assert abs(dur - (dur_plain - 144 * BASE.b1_ms / 1000 + 9 * 0.5 / 1000)) < 1e-9
    assert eng.stats.prefix_cache_hits == 0  # CPU loads are not GPU prefix-cache hits


def test_cpu_pool_evicts_lru_and_publishes_medium_cpu() -> None:
    prof = BASE.replace(cpu_offload_blocks=12, cpu_load_ms_per_block=0.1)
    eng = Engine(prof)
    now, ev1, _, _ = _run(eng, "a", list(range(1, 161)), 0.0)
    now, ev2, _, _ = _run(eng, "b", list(range(500, 660)), now)
    removed = [e for e in ev2 if isinstance(e, BlockRemoved) and e.medium == "CPU"]
    assert sum(len(e.block_hashes) for e in removed) == 8  # 20 blocks into a 12-block pool
    assert eng.cpu_tier is not None and len(eng.cpu_tier) == 12
    wire = encode_event(next(e for e in ev1 if isinstance(e, BlockStored) and e.medium == "CPU"))
    assert wire["medium"] == "CPU" and wire["type"] == "BlockStored"
    arr = encode_event(removed[0], array_encoding=True)
    assert arr[0] == "BlockRemoved" and arr[2] == "CPU"
    decoded = decode_payload(encode_batch(ev1 + ev2, 0.0)).events
    assert {getattr(e, "medium", None) for e in decoded} >= {"GPU", "CPU"}
    assert msgpack.unpackb(encode_batch(ev1, 1.0))[0] == 1.0


def test_tier_aware_index_scores_cpu_blocks_at_a_discount() -> None:
    prof = BASE.replace(cpu_offload_blocks=64, cpu_load_ms_per_block=0.1)
    eng = Engine(prof)
    a = list(range(1, 161))
    now, ev, _, _ = _run(eng, "a", a, 0.0)
    for i in range(3):
        now, e2, _, _ = _run(eng, f"b{i}", list(range(1000 * (i + 1), 1000 * (i + 1) + 300)), now)
        ev += e2
    for cfg_name, expect_cpu in (("precise-prefix", True), ("precise-prefix-gpu-only", False)):
        cfg = load_config(cfg_name, EndpointPool())
        index = cfg.plugins["precise-prefix-cache"].index
        index.apply("p", decode_payload(encode_batch(ev, 0.0)).events)
        keys = index.keys_for(a, 16)
        assert index.lookup(keys, ["p"]) == {"p": 10}  # all 10 blocks are still in some medium (CPU)
        w = cfg.plugins["precise-prefix-cache"]
        assert (w.cpu_weight > 0) is expect_cpu


def test_shipped_offload_and_roofline_profiles_load() -> None:
    from pathlib import Path

    from extproc.sim.profiles import get_profile

    root = Path(__file__).resolve().parents[3] / "models" / "sim-profiles"
    off = get_profile(str(root / "llama3-8b-h100-cpu-offload.yaml"))
    assert off.cpu_offload_blocks == 900 and Engine(off).cpu_tier is not None
    roof = get_profile(str(root / "llama3-8b-h100-roofline.yaml"))
    eng = Engine(roof)
    assert eng.step_model is not None and eng.cpu_tier is None


def test_named_roofline_profiles_match_the_shipped_yaml() -> None:
    from pathlib import Path

    from extproc.sim.profiles import get_profile

    root = Path(__file__).resolve().parents[3] / "models" / "sim-profiles"
    assert get_profile("llama3-8b-h100-roofline") == get_profile(str(root / "llama3-8b-h100-roofline.yaml"))
    tp4 = get_profile("llama3-8b-h100-tp4-roofline")
    assert tp4.tensor_parallel == 4 and tp4.roofline is not None and tp4.roofline["tp"] == 4
    # decode cost grows with context (what the linear profiles' constant b2 leaves out): 50 sequences at 5k
    # context take longer than at 1k
    from extproc.sim.roofline import step_model_from_profile

    class _S:
        def __init__(self, ctx: int) -> None:
            self.num_computed = ctx

    m = step_model_from_profile(get_profile("llama3-8b-h100-roofline").roofline)
    assert m([(_S(5000), 1)] * 50) > 1.5 * m([(_S(1000), 1)] * 50)
