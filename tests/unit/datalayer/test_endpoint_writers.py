"""One owner per Endpoint field: outside ``extproc/datalayer/endpoint.py`` no product or lab module assigns an
Endpoint field directly; every write goes through the owner's writer method (module docstring of
``extproc.datalayer.endpoint``). The AST of every module is walked (nothing is executed); tests may still set
fields to build a state. Plus the writer methods' semantics."""

from __future__ import annotations

import ast
from pathlib import Path

import extproc
from extproc.datalayer.endpoint import Endpoint, PodMetrics

PKG = Path(extproc.__file__).resolve().parent
# Endpoint fields with a single writer (``address``/``host``/``port`` are set once at construction)
OWNED = {
    "models", "healthy", "scrape_failures", "last_error", "inflight", "inflight_prefill_tokens",
    "inflight_decode_tokens", "removed", "last_chunk_ts", "chunk_interval_s", "pod_class",
}  # fmt: skip
# receivers that are Endpoints in the code base (``ep.metrics`` elsewhere is often a SchedulerMetrics, so
# ``metrics`` is checked on these names only)
EP_NAMES = {"ep", "endpoint", "e", "pep", "prefill", "primary", "target"}
# other classes that own a field of the same name: batch dispatch counts its own in-flight; the scraper's
# per-pod state (``st``) has its own ``removed``
EXEMPT = {PKG / "datalayer" / "endpoint.py", PKG / "batch" / "dispatch.py"}
OTHER_RECEIVERS = {"self", "st"}


def _receiver(node: ast.expr) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _writes(path: Path) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if not isinstance(t, ast.Attribute) or _receiver(t) in OTHER_RECEIVERS:
                continue
            direct = t.value
            name = direct.attr if isinstance(direct, ast.Attribute) else _receiver(direct)
            if t.attr in OWNED or (t.attr == "metrics" and name in EP_NAMES):
                out.append((node.lineno, f"{ast.unparse(t)}"))
    return out


def test_no_direct_endpoint_field_writes_outside_the_owner_methods() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path in EXEMPT:
            continue
        for line, target in _writes(path):
            bad.append(f"{path.relative_to(PKG.parent)}:{line}: {target} = ...")
    assert not bad, "Endpoint fields written directly (use the owner's writer method):\n" + "\n".join(bad)


def test_writer_methods() -> None:
    ep = Endpoint("10.0.0.1:8000")
    ep.add_inflight(100)
    ep.add_inflight(50)
    assert (ep.inflight, ep.inflight_prefill_tokens, ep.inflight_decode_tokens) == (2, 150, 0)
    ep.prefill_done(100, 16)
    ep.release_inflight(decode_tokens=16)
    ep.release_inflight(prefill_tokens=50)
    assert (ep.inflight, ep.inflight_prefill_tokens, ep.inflight_decode_tokens) == (0, 0, 0)
    assert not ep.scrape_failed("timeout", 2) and ep.healthy
    ep.note_upstream_failure()
    assert ep.scrape_failures == 2 and ep.healthy  # evidence only: the scraper decides health
    assert ep.scrape_failed("x" * 500, 2)  # the scraper's next failure crosses the threshold: unhealthy
    assert not ep.healthy and len(ep.last_error) == 200
    assert ep.scrape_ok() and ep.healthy and ep.scrape_failures == 0 and ep.last_error == ""
    assert not ep.scrape_ok()
    m = PodMetrics(waiting=3, updated_at=1.0)
    ep.set_metrics(m)
    ep.set_models(frozenset({"a"}))
    ep.set_chunk_timing(5.0, 0.02)
    assert ep.metrics is m and ep.models == {"a"} and (ep.last_chunk_ts, ep.chunk_interval_s) == (5.0, 0.02)
