"""P/D in the simulator: NixlConnector-style kv_transfer_params, transfer time from model dimensions, failures."""

from __future__ import annotations

import pytest

from extproc.sim.engine import Engine, SimRequest
from extproc.sim.kvtransfer import LINKS, kv_bytes_per_token, transfer_seconds
from extproc.sim.profiles import get_profile


def test_kv_bytes_per_token_llama3_8b() -> None:
    assert kv_bytes_per_token(32, 8, 128, 2) == 131_072
    assert get_profile("llama3-8b-h100").kv_bytes_per_token == 131_072
    assert get_profile("llama3-70b-h100-tp4").kv_bytes_per_token == 2 * 80 * 8 * 128 * 2


def test_transfer_time_rdma_vs_tcp() -> None:
    b = 131_072
    rdma = transfer_seconds(5000, b, LINKS["rdma-400g"])
    tcp = transfer_seconds(5000, b, LINKS["tcp-25g"])
    # 655 MB: 0.5 ms + 655e6 / (50e9 * 0.8) = 16.9 ms; tcp: 2 ms + 655e6 / (3.125e9 * 0.8) = 264 ms
    assert rdma == pytest.approx(0.0005 + 5000 * b / 40e9)
    assert tcp == pytest.approx(0.002 + 5000 * b / 2.5e9)
    assert tcp > 10 * rdma
    assert transfer_seconds(0, b, LINKS["rdma-400g"]) == 0.0


def _run(eng: Engine, now: float = 0.0, limit: int = 10_000) -> tuple[float, list]:
    outs = []
    for _ in range(limit):
        if not eng.has_work():
            break
        res = eng.step(now)
        now += res.duration_s
        outs.extend((now, o) for o in res.outputs)
    return now, outs


def test_remote_tokens_skip_prefill_and_wait_for_transfer() -> None:
    prof = get_profile("llama3-8b-h100")
    ids = list(range(1, 4001))
    local = Engine(prof, seed=1)
    local.add_request(SimRequest("a", ids, 4, arrival=0.0))
    _, outs = _run(local)
    t_local_first = next(t for t, o in outs if o.first_token)
    remote = Engine(prof, seed=1)
    ready = 0.05
    remote.add_request(SimRequest("a", ids, 4, arrival=0.0, remote_tokens=3999, ready_at=ready))
    _, outs = _run(remote)
    t_remote_first = next(t for t, o in outs if o.first_token)
    # local: one ~128 ms prefill step; remote: idle until the KV lands, then a 1-token step
    assert t_local_first > 0.1
    assert ready <= t_remote_first < ready + 0.02
    assert remote.stats.kv_transfers_total == 1 and remote.stats.kv_transfer_tokens_total == 3999
    assert remote.stats.prompt_tokens_total == 4000


def test_idle_wait_does_not_block_other_requests() -> None:
    eng = Engine(get_profile("llama3-8b-h100"), seed=1)
    eng.add_request(SimRequest("remote", list(range(1, 2001)), 2, arrival=0.0, remote_tokens=1999, ready_at=1.0))
    eng.add_request(SimRequest("local", list(range(5000, 5100)), 2, arrival=0.0))
    _, outs = _run(eng)
    done = {o.request_id: t for t, o in outs if o.finished}
    assert done["local"] < 0.1 < 1.0 <= done["remote"]


@pytest.mark.parametrize("policy", ["fail", "recompute"])
def test_failed_transfer_honours_policy(policy: str) -> None:
    eng = Engine(get_profile("llama3-8b-h100"), seed=1)
    eng.add_request(SimRequest("r", list(range(1, 3001)), 3, arrival=0.0, remote_tokens=2999, ready_at=0.02,
                               remote_failed=True, failure_policy=policy))
    _, outs = _run(eng)
    last = [o for _, o in outs if o.finished][0]
    assert eng.stats.kv_transfer_failures_total == 1
    if policy == "fail":
        assert last.finish_reason == "error" and last.num_output_tokens == 0
    else:
        assert last.finish_reason == "length" and last.num_output_tokens == 3
        assert eng.stats.kv_transfers_total == 0  # recomputed locally


def test_prefill_leg_returns_block_ids() -> None:
    eng = Engine(get_profile("llama3-8b-h100"), seed=1)
    eng.add_request(SimRequest("p", list(range(1, 101)), 1, arrival=0.0, remote_decode=True))
    _, outs = _run(eng)
    o = outs[-1][1]
    assert o.finished and o.block_ids is not None and len(o.block_ids) == 7  # ceil(101 / 16) for 100 + 1 tokens
