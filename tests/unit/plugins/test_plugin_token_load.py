from __future__ import annotations

import pytest

from extproc.scheduling.framework import CycleState
from extproc.scheduling.plugins.token_load import TokenLoadScorer
from extproc.scheduling.registry import PluginContext

from plugin_testlib import make_endpoint, make_request


def test_absolute_token_load(ctx: PluginContext, cycle: CycleState) -> None:
    eps = [make_endpoint(i) for i in range(4)]
    for e, (p, d) in zip(eps, [(0, 0), (100, 150), (800, 200), (5000, 0)]):
        e.inflight_prefill_tokens, e.inflight_decode_tokens = p, d
    s = TokenLoadScorer.from_config("tl", {"maxTokens": 1000}, ctx).score(cycle, make_request(), eps)
    assert s == pytest.approx([1.0, 0.75, 0.0, 0.0])


def test_default_max_tokens(cycle: CycleState) -> None:
    e = make_endpoint(0)
    e.inflight_prefill_tokens = 32768
    assert TokenLoadScorer("tl").score(cycle, make_request(), [e]) == pytest.approx([0.5])


@pytest.mark.parametrize("bad", [0, -1, "1k", 2.5])
def test_bad_max_tokens(ctx: PluginContext, bad: object) -> None:
    with pytest.raises((ValueError, TypeError), match="maxTokens"):
        TokenLoadScorer.from_config("tl", {"maxTokens": bad}, ctx)
