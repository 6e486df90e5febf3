"""The one virtual fleet loop (extproc.sim.vfleet), shared by the virtual benchmark and the training-data
generator: event order, the per-pod step cycle, and the idle-wait cut-short."""

from __future__ import annotations

from extproc.datalayer.endpoint import Endpoint
from extproc.sim.engine import Engine, SimRequest, StepResult
from extproc.sim.profiles import get_profile
from extproc.sim.vfleet import TICK, VirtualFleetLoop, VirtualPod, engine_metrics


def _pod(i: int = 0) -> VirtualPod:
    return VirtualPod(Endpoint(f"10.0.0.{i + 1}:8000", {}, ["m"]), Engine(get_profile("llama3-8b-h100"), seed=i))


def test_requests_run_to_completion_in_time_order() -> None:
    pod = _pod()
    finished: dict[str, float] = {}
    seen: list[float] = []

    def deliver(p: VirtualPod, res: StepResult, now: float) -> None:
        assert p is pod and not p.stepping and p.busy_until == -1.0
        for o in res.outputs:
            if o.finished:
                finished[o.request_id] = now

    loop = VirtualFleetLoop(deliver)
    arrivals = [0.0, 0.01, 0.5]
    loop.add_arrivals(arrivals)

    def arrive(i: int, now: float) -> None:
        assert now == arrivals[i]
        pod.engine.add_request(SimRequest(f"r{i}", list(range(100 + i, 300 + i)), 8, arrival=now))
        loop.kick(pod, now)

    loop.run(arrive, before=seen.append)
    assert sorted(finished) == ["r0", "r1", "r2"]
    assert seen == sorted(seen) and loop.now == max(finished.values())
    assert finished["r2"] > 0.5 and loop.steps >= 8 and not pod.engine.has_work()


def test_ticks_and_stop() -> None:
    loop = VirtualFleetLoop(lambda p, r, t: None)
    ticks: list[float] = []

    def tick(_: object, now: float) -> None:
        ticks.append(now)
        loop.push(now + 0.25, TICK)

    loop.push(0.0, TICK)
    loop.run(lambda i, t: None, on_tick=tick, stop=lambda: len(ticks) >= 5)
    assert ticks == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_arrivals_go_ahead_of_step_ends_at_the_same_instant() -> None:
    order: list[str] = []
    pod = _pod()
    loop = VirtualFleetLoop(lambda p, r, t: order.append(f"end@{t}"))
    pod.engine.add_request(SimRequest("a", list(range(64)), 1, arrival=0.0))
    loop.start_step(pod, 0.0)
    end = pod.busy_until
    loop.events.clear()
    loop.add_arrivals([end])  # pushed first → lower seq than the step end pushed below
    loop.push(end, 1, (pod, pod.token))
    loop.run(lambda i, t: order.append(f"arrival@{t}"))
    assert order == [f"arrival@{end}", f"end@{end}"]


def test_engine_metrics_is_what_a_scrape_gives() -> None:
    pod = _pod()
    pod.engine.add_request(SimRequest("a", list(range(200)), 4, arrival=0.0))
    m = engine_metrics(pod.engine, 3.5)
    assert (m.waiting, m.running, m.updated_at) == (1, 0, 3.5)
    assert m.block_size == pod.engine.profile.block_size and m.num_gpu_blocks == pod.engine.profile.num_gpu_blocks
