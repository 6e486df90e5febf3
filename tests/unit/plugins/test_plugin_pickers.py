from __future__ import annotations

from collections import Counter

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.pickers import MaxScorePicker, RandomPicker, WeightedRandomPicker
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request, scored

REQ = make_request()


def _eps(n: int) -> list:
    return [make_endpoint(i) for i in range(n)]


def test_max_score_picks_highest(ctx: PluginContext, cycle: CycleState) -> None:
    eps = _eps(4)
    p = MaxScorePicker.from_config("max", {"seed": 1}, ctx)
    assert p.pick(cycle, REQ, scored(eps, [0.1, 3.0, 2.9, 0.0])) == [eps[1]]
    assert p.pick(cycle, REQ, []) == []


def test_max_score_tie_break_is_random_across_calls(ctx: PluginContext, cycle: CycleState) -> None:
    eps = _eps(4)
    p = MaxScorePicker.from_config("max", {"seed": 7}, ctx)
    s = scored(eps, [1.0, 2.0, 2.0, 2.0])
    counts = Counter(p.pick(cycle, REQ, s)[0].address for _ in range(3000))
    assert eps[0].address not in counts
    assert set(counts) == {eps[1].address, eps[2].address, eps[3].address}
    for c in counts.values():
        assert 800 < c < 1200  # uniform over the three tied pods (expected 1000)


def test_max_score_fallbacks_in_score_order(ctx: PluginContext, cycle: CycleState) -> None:
    eps = _eps(5)
    p = MaxScorePicker.from_config("max", {"maxNumOfEndpoints": 3, "seed": 3}, ctx)
    assert p.pick(cycle, REQ, scored(eps, [0.5, 4.0, 0.1, 2.0, 3.0])) == [eps[1], eps[4], eps[3]]
    # Fewer candidates than N: all of them.
    assert p.pick(cycle, REQ, scored(eps[:2], [1.0, 2.0])) == [eps[1], eps[0]]
    # Ties among the fallbacks are ordered randomly.
    tie = scored(eps[:3], [5.0, 1.0, 1.0])
    seconds = Counter(p.pick(cycle, REQ, tie)[1].address for _ in range(400))
    assert set(seconds) == {eps[1].address, eps[2].address}


def test_random_picker_uniform_and_n_distinct(ctx: PluginContext, cycle: CycleState) -> None:
    eps = _eps(4)
    p = RandomPicker.from_config("rnd", {"seed": 11}, ctx)
    s = scored(eps, [100.0, 0.0, 0.0, 0.0])  # scores are ignored
    counts = Counter(p.pick(cycle, REQ, s)[0].address for _ in range(4000))
    assert all(800 < counts[e.address] < 1200 for e in eps)
    p3 = RandomPicker.from_config("rnd", {"maxNumOfEndpoints": 3, "seed": 2}, ctx)
    picks = p3.pick(cycle, REQ, s)
    assert len(picks) == 3 and len(set(map(id, picks))) == 3
    assert p3.pick(cycle, REQ, []) == []


def test_weighted_random_follows_scores(ctx: PluginContext, cycle: CycleState) -> None:
    eps = _eps(3)
    p = WeightedRandomPicker.from_config("w", {"seed": 5}, ctx)
    s = scored(eps, [1.0, 2.0, 5.0])
    n = 8000
    counts = Counter(p.pick(cycle, REQ, s)[0].address for _ in range(n))
    for e, share in zip(eps, [1 / 8, 2 / 8, 5 / 8]):
        assert abs(counts[e.address] / n - share) < 0.03


def test_weighted_random_zero_scores_only_when_nothing_else(ctx: PluginContext, cycle: CycleState) -> None:
    eps = _eps(4)
    p = WeightedRandomPicker.from_config("w", {"seed": 9, "maxNumOfEndpoints": 3}, ctx)
    s = scored(eps, [0.0, 0.5, 0.0, 0.25])
    for _ in range(300):
        picks = p.pick(cycle, REQ, s)
        assert {picks[0].address, picks[1].address} == {eps[1].address, eps[3].address}
        assert picks[2] in (eps[0], eps[2])
    single = WeightedRandomPicker.from_config("w1", {"seed": 9}, ctx)
    assert all(single.pick(cycle, REQ, s)[0] in (eps[1], eps[3]) for _ in range(300))
    # All zero → uniform random.
    zero = scored(eps, [0.0] * 4)
    counts = Counter(single.pick(cycle, REQ, zero)[0].address for _ in range(2000))
    assert len(counts) == 4
    assert len(p.pick(cycle, REQ, zero)) == 3
    assert single.pick(cycle, REQ, []) == []


@pytest.mark.parametrize("cls", [MaxScorePicker, RandomPicker, WeightedRandomPicker])
@pytest.mark.parametrize(
    "params, err",
    [({"maxNumOfEndpoints": 0}, "maxNumOfEndpoints"), ({"seed": "x"}, "seed"), ({"max": 2}, "unknown parameter")],
)
def test_bad_parameters(ctx: PluginContext, cls: type, params: dict[str, object], err: str) -> None:
    with pytest.raises((ValueError, TypeError), match=err):
        cls.from_config("p", params, ctx)  # type: ignore[attr-defined]
