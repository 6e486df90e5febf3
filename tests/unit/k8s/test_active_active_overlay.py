"""``manifests/overlays/active-active``: 3 scheduler replicas sharing state through one Redis (docs/deployment.md)."""

from __future__ import annotations

from test_k8s_manifests import MANIFESTS, build, by_kind, validate


def test_active_active_overlay_wiring() -> None:
    objs = build(MANIFESTS / "overlays/active-active")
    for o in objs:
        validate(o)
    dep = by_kind(objs, "Deployment", "vllm-llama3-8b-epp")
    assert dep["spec"]["replicas"] == 3
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EXTPROC_SHARED_STATE"]["value"] == "redis://extproc-redis:6379/0"
    assert env["EXTPROC_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    redis_svc = by_kind(objs, "Service", "extproc-redis")
    redis = by_kind(objs, "Deployment", "extproc-redis")
    assert redis_svc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    headless = by_kind(objs, "Service", "vllm-llama3-8b-epp-replicas")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # the Envoy Gateway pieces come along unchanged (ext_proc to the scheduler Service, which selects every replica)
    assert by_kind(objs, "EnvoyExtensionPolicy")
    assert all(o["metadata"].get("namespace", "default") == "default" for o in objs)
