"""Role and label filters: decisions on pods with fixed labels."""

from __future__ import annotations

import pytest

from extproc.datalayer.endpoint import Endpoint
from extproc.plugin import CycleState, PluginContext
from extproc.scheduling import registry

from plugin_testlib import make_request

ROLES = ["decode", "prefill", "encode", "prefill-decode", "both", "encode-prefill", "encode-prefill-decode", None]


def _pods() -> list[Endpoint]:
    out = []
    for i, role in enumerate(ROLES):
        out.append(Endpoint(f"10.0.1.{i}:8000", labels={"llm-d.ai/role": role, "hw": "h100" if i % 2 else "a100"} if role else {"hw": "a100"}))
    return out


def _build(t: str, ctx: PluginContext, **params: object):
    registry.load_builtin_plugins()
    return registry.PLUGIN_TYPES[t](t, dict(params), ctx)


def _kept(f, pods: list[Endpoint]) -> list[str | None]:
    kept = {e.address for e in f.filter(CycleState(), make_request(), pods)}
    return [ROLES[i] for i, e in enumerate(pods) if e.address in kept]


def test_decode_filter_keeps_unlabelled(ctx: PluginContext) -> None:
    assert _kept(_build("decode-filter", ctx), _pods()) == ["decode", "prefill-decode", "both", "encode-prefill-decode", None]


def test_prefill_filter(ctx: PluginContext) -> None:
    assert _kept(_build("prefill-filter", ctx), _pods()) == ["prefill", "prefill-decode", "both", "encode-prefill", "encode-prefill-decode"]


def test_encode_filter(ctx: PluginContext) -> None:
    assert _kept(_build("encode-filter", ctx), _pods()) == ["encode", "encode-prefill", "encode-prefill-decode"]


def test_role_filters_take_no_parameters(ctx: PluginContext) -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        _build("decode-filter", ctx, role="x")


def test_by_label(ctx: PluginContext) -> None:
    f = _build("by-label", ctx, label="llm-d.ai/role", validValues=["prefill"], allowsNoLabel=True)
    assert _kept(f, _pods()) == ["prefill", None]
    with pytest.raises(ValueError, match="validValues"):
        _build("by-label", ctx, label="x")
    with pytest.raises(TypeError, match="'label'"):
        _build("by-label", ctx, validValues=["a"])


@pytest.mark.parametrize("t", ["label-selector-filter", "by-label-selector"])
def test_label_selector(ctx: PluginContext, t: str) -> None:
    f = _build(t, ctx, matchLabels={"hw": "h100"})
    assert _kept(f, _pods()) == ["prefill", "prefill-decode", "encode-prefill"]
    f = _build(t, ctx, matchExpressions=[{"key": "llm-d.ai/role", "operator": "In", "values": ["decode", "prefill"]}])
    assert _kept(f, _pods()) == ["decode", "prefill"]
    f = _build(t, ctx, matchExpressions=[{"key": "llm-d.ai/role", "operator": "DoesNotExist"}])
    assert _kept(f, _pods()) == [None]
    f = _build(t, ctx, matchLabels={"hw": "a100"}, matchExpressions=[{"key": "llm-d.ai/role", "operator": "NotIn", "values": ["decode"]}])
    assert _kept(f, _pods()) == ["encode", "both", "encode-prefill-decode", None]
    f = _build(t, ctx, matchExpressions=[{"key": "llm-d.ai/role", "operator": "Exists"}])
    assert None not in _kept(f, _pods()) and len(_kept(f, _pods())) == 7
    assert len(_kept(_build(t, ctx), _pods())) == 8  # empty selector matches everything


def test_label_selector_rejects_bad_expressions(ctx: PluginContext) -> None:
    with pytest.raises(ValueError, match="operator"):
        _build("label-selector-filter", ctx, matchExpressions=[{"key": "a", "operator": "Equals", "values": ["x"]}])
    with pytest.raises(ValueError, match="needs non-empty"):
        _build("label-selector-filter", ctx, matchExpressions=[{"key": "a", "operator": "In"}])
    with pytest.raises(TypeError, match="matchLabels"):
        _build("label-selector-filter", ctx, matchLabels={"a": 1})
