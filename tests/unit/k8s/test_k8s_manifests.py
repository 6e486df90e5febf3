"""Every kustomization under manifests/ builds and validates.

There is no ``kustomize`` binary on PyPI (the ``kustomize`` package there is an unrelated tool), so
:func:`build` implements the subset our manifests use: ``resources`` (files and directories), ``namespace``,
and ``patches`` with a ``target`` and an inline patch that is either a JSON6902 op list or a strategic-merge
document (deep merge, ``$patch: delete``). Core objects are validated with ``kubernetes-validate`` against a
Kubernetes version schema it ships (strict: unknown fields fail); CRD objects (InferencePool, HTTPRoute,
Gateway, Envoy Gateway policies, Istio DestinationRule) against JSON schemas written here from the CRDs'
documented fields.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.33.0"
KUSTOMIZATIONS = sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


# ---------------------------------------------------------------------------------------------
# the kustomize subset


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    if "group" in target and target["group"] != group:
        return False
    if "version" in target and target["version"] != version:
        return False
    if "kind" in target and target["kind"] != obj.get("kind"):
        return False
    return "name" not in target or target["name"] == obj["metadata"]["name"]


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]] if path else []


def _json6902(doc: Any, ops: list[dict[str, Any]]) -> Any:
    for op in ops:
        parts = _pointer(op["path"])
        if not parts:
            raise AssertionError(f"whole-document patch ops are not used: {op}")
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[idx]
            else:
                raise AssertionError(f"unsupported op {kind}")
        else:
            if kind in ("replace", "remove") and last not in parent:
                raise AssertionError(f"{kind} of missing path {op['path']}")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            else:
                raise AssertionError(f"unsupported op {kind}")
    return doc


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out_list = [copy.deepcopy(x) for x in base]
        for item in patch:
            i = next((j for j, x in enumerate(out_list) if x["name"] == item["name"]), None)
            if i is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[i] = _merge(out_list[i], item)
        return out_list
    return copy.deepcopy(patch)


def build(directory: Path) -> list[dict[str, Any]]:
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    allowed = {"apiVersion", "kind", "resources", "namespace", "patches"}
    assert set(k) <= allowed, f"{kfile}: fields beyond the supported subset: {set(k) - allowed}"
    assert k.get("kind") == "Kustomization" and k.get("apiVersion") == "kustomize.config.k8s.io/v1beta1"
    objs: list[dict[str, Any]] = []
    for res in k.get("resources") or ():
        path = (directory / res).resolve()
        assert path.exists(), f"{kfile}: missing resource {res}"
        objs.extend(build(path) if path.is_dir() else _load_docs(path))
    for patch in k.get("patches") or ():
        target = patch["target"]
        body = yaml.safe_load(patch["patch"]) if "patch" in patch else yaml.safe_load((directory / patch["path"]).read_text())
        hits = [o for o in objs if _matches(o, target)]
        assert hits, f"{kfile}: patch target {target} matches nothing"
        for obj in hits:
            if isinstance(body, list):
                _json6902(obj, body)
            elif body.get("$patch") == "delete":
                objs.remove(obj)
            else:
                obj.update(_merge(obj, body))
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in ("GatewayClass", "ClusterRole", "ClusterRoleBinding", "Namespace"):
                o["metadata"]["namespace"] = k["namespace"]
            for s in o.get("subjects") or ():
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = k["namespace"]
    keys = [(o["apiVersion"].rpartition("/")[0], o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), f"{kfile}: duplicate objects {keys}"
    return objs


# ---------------------------------------------------------------------------------------------
# schemas for the CRD objects (from the CRDs' documented fields: required fields, types, enums)

_NAME = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_META = {"type": "object", "required": ["name"], "properties": {"name": _NAME, "namespace": _NAME}}
_PARENT_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME, "namespace": _NAME, "sectionName": {"type": "string"}, "port": _PORT},
}
_TARGET_REF = {
    "type": "object",
    "required": ["group", "kind", "name"],
    "additionalProperties": False,
    "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME, "sectionName": {"type": "string"}},
}


def _obj(api: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": _META, "spec": spec},
    }


# inference.networking.k8s.io/v1 InferencePool (GIE api/v1/inferencepool_types.go)
INFERENCE_POOL = _obj(
    "inference.networking.k8s.io/v1",
    "InferencePool",
    {
        "type": "object",
        "required": ["selector", "targetPorts", "endpointPickerRef"],
        "additionalProperties": False,
        "properties": {
            "selector": {
                "type": "object",
                "required": ["matchLabels"],
                "additionalProperties": False,
                "properties": {"matchLabels": {"type": "object", "minProperties": 1, "maxProperties": 64, "additionalProperties": {"type": "string", "maxLength": 63}}},
            },
            "targetPorts": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {"type": "object", "required": ["number"], "additionalProperties": False, "properties": {"number": _PORT}},
            },
            "endpointPickerRef": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "group": {"type": "string"},
                    "kind": {"type": "string", "minLength": 1},
                    "name": _NAME,
                    "port": {"type": "object", "required": ["number"], "additionalProperties": False, "properties": {"number": _PORT}},
                    "failureMode": {"enum": ["FailOpen", "FailClose"]},
                },
                # CEL rule of the CRD: port is required when kind is Service (the default kind)
                "if": {"anyOf": [{"not": {"required": ["kind"]}}, {"properties": {"kind": {"const": "Service"}}}]},
                "then": {"required": ["port"]},
            },
        },
    },
)

# gateway.networking.k8s.io/v1 HTTPRoute (the subset we use)
HTTP_ROUTE = _obj(
    "gateway.networking.k8s.io/v1",
    "HTTPRoute",
    {
        "type": "object",
        "required": ["parentRefs", "rules"],
        "properties": {
            "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": _PARENT_REF},
            "rules": {
                "type": "array",
                "minItems": 1,
                "maxItems": 16,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matches": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "path": {
                                        "type": "object",
                                        "properties": {"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]}, "value": {"type": "string", "pattern": "^/"}},
                                    }
                                },
                            },
                        },
                        "backendRefs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME, "namespace": _NAME, "port": _PORT, "weight": {"type": "integer", "minimum": 0}},
                            },
                        },
                        "timeouts": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "request": {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                                "backendRequest": {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                            },
                        },
                    },
                },
            },
        },
    },
)

GATEWAY = _obj(
    "gateway.networking.k8s.io/v1",
    "Gateway",
    {
        "type": "object",
        "required": ["gatewayClassName", "listeners"],
        "properties": {
            "gatewayClassName": _NAME,
            "listeners": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "port", "protocol"],
                    "properties": {"name": {"type": "string"}, "port": _PORT, "protocol": {"type": "string"}, "allowedRoutes": {"type": "object"}},
                },
            },
        },
    },
)

GATEWAY_CLASS = _obj(
    "gateway.networking.k8s.io/v1",
    "GatewayClass",
    {"type": "object", "required": ["controllerName"], "properties": {"controllerName": {"type": "string", "pattern": r"^[a-z0-9.-]+/[A-Za-z0-9/._-]+$"}}},
)

# gateway.envoyproxy.io/v1alpha1 EnvoyExtensionPolicy (extProc subset)
ENVOY_EXTENSION_POLICY = _obj(
    "gateway.envoyproxy.io/v1alpha1",
    "EnvoyExtensionPolicy",
    {
        "type": "object",
        "properties": {
            "targetRefs": {"type": "array", "minItems": 1, "items": _TARGET_REF},
            "targetRef": _TARGET_REF,
            "extProc": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["backendRefs"],
                    "additionalProperties": False,
                    "properties": {
                        "backendRefs": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "object", "required": ["name", "port"], "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "name": _NAME, "port": _PORT}},
                        },
                        "processingMode": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "allowModeOverride": {"type": "boolean"},
                                "request": {"type": ["object", "null"], "properties": {"body": {"enum": ["Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed"]}}},
                                "response": {"type": ["object", "null"], "properties": {"body": {"enum": ["Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed"]}}},
                            },
                        },
                        "messageTimeout": {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                        "failOpen": {"type": "boolean"},
                        "backendSettings": {"type": "object"},
                    },
                },
            },
        },
        "oneOf": [{"required": ["targetRefs", "extProc"]}, {"required": ["targetRef", "extProc"]}],
    },
)

ENVOY_PATCH_POLICY = _obj(
    "gateway.envoyproxy.io/v1alpha1",
    "EnvoyPatchPolicy",
    {
        "type": "object",
        "required": ["targetRef", "type", "jsonPatches"],
        "properties": {
            "targetRef": _TARGET_REF,
            "type": {"enum": ["JSONPatch"]},
            "jsonPatches": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["type", "name", "operation"],
                    "properties": {
                        "type": {"type": "string", "pattern": r"^type\.googleapis\.com/envoy\."},
                        "name": {"type": "string"},
                        "operation": {"type": "object", "required": ["op", "path"], "properties": {"op": {"enum": ["add", "remove", "replace", "move", "copy", "test"]}, "path": {"type": "string"}}},
                    },
                },
            },
        },
    },
)

DESTINATION_RULE = _obj(
    "networking.istio.io/v1",
    "DestinationRule",
    {
        "type": "object",
        "required": ["host"],
        "properties": {
            "host": {"type": "string", "minLength": 1},
            "trafficPolicy": {
                "type": "object",
                "properties": {"tls": {"type": "object", "properties": {"mode": {"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]}, "insecureSkipVerify": {"type": "boolean"}}}},
            },
        },
    },
)

_HEADER_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}$"}

# gateway.envoyproxy.io/v1alpha1 ClientTrafficPolicy (headers.earlyRequestHeaders subset)
CLIENT_TRAFFIC_POLICY = _obj(
    "gateway.envoyproxy.io/v1alpha1",
    "ClientTrafficPolicy",
    {
        "type": "object",
        "properties": {
            "targetRefs": {"type": "array", "minItems": 1, "items": _TARGET_REF},
            "targetRef": _TARGET_REF,
            "headers": {
                "type": "object",
                "properties": {
                    "earlyRequestHeaders": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "remove": {"type": "array", "maxItems": 16, "items": _HEADER_NAME},
                            "set": {"type": "array", "items": {"type": "object", "required": ["name", "value"]}},
                            "add": {"type": "array", "items": {"type": "object", "required": ["name", "value"]}},
                        },
                    }
                },
            },
        },
        "oneOf": [{"required": ["targetRefs"]}, {"required": ["targetRef"]}],
    },
)

# networking.istio.io/v1alpha3 EnvoyFilter (configPatches subset)
ENVOY_FILTER = _obj(
    "networking.istio.io/v1alpha3",
    "EnvoyFilter",
    {
        "type": "object",
        "required": ["configPatches"],
        "properties": {
            "workloadSelector": {"type": "object", "required": ["labels"], "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
            "configPatches": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["applyTo", "patch"],
                    "properties": {
                        "applyTo": {"enum": ["LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER"]},
                        "match": {"type": "object", "properties": {"context": {"enum": ["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"]}}},
                        "patch": {
                            "type": "object",
                            "required": ["operation", "value"],
                            "properties": {"operation": {"enum": ["MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE"]}, "value": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
)

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"): CLIENT_TRAFFIC_POLICY,
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): ENVOY_FILTER,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
    ("gateway.networking.k8s.io/v1", "Gateway"): GATEWAY,
    ("gateway.networking.k8s.io/v1", "GatewayClass"): GATEWAY_CLASS,
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyExtensionPolicy"): ENVOY_EXTENSION_POLICY,
    ("gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy"): ENVOY_PATCH_POLICY,
    ("networking.istio.io/v1", "DestinationRule"): DESTINATION_RULE,
}


def validate(obj: dict[str, Any]) -> None:
    schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        jsonschema.validate(obj, schema)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def by_kind(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


# ---------------------------------------------------------------------------------------------
# tests


def test_all_kustomizations_found() -> None:
    names = {str(p.relative_to(MANIFESTS)) for p in KUSTOMIZATIONS}
    assert {"base", "overlays/envoy-gateway", "overlays/istio", "overlays/plain-envoy", "examples/vllm"} <= names


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_kustomization_builds_and_validates(directory: Path) -> None:
    objs = build(directory)
    assert objs
    for obj in objs:
        validate(obj)


def test_every_manifest_file_is_used_by_a_kustomization() -> None:
    used: set[Path] = set()
    for d in KUSTOMIZATIONS:
        k = yaml.safe_load((d / "kustomization.yaml").read_text())
        used |= {(d / r).resolve() for r in k.get("resources") or ()}
    files = {p.resolve() for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files <= used, f"unreferenced manifests: {sorted(map(str, files - used))}"


def test_validation_rejects_broken_objects() -> None:
    objs = build(MANIFESTS / "base")
    pool = copy.deepcopy(by_kind(objs, "InferencePool"))
    pool["spec"]["endpointPickerRef"]["failureMode"] = "FailSometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate(pool)
    pool = copy.deepcopy(by_kind(objs, "InferencePool"))
    del pool["spec"]["endpointPickerRef"]["port"]
    with pytest.raises(jsonschema.ValidationError):
        validate(pool)
    dep = copy.deepcopy(by_kind(objs, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9002"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)
    dep = copy.deepcopy(by_kind(objs, "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(dep)


def test_base_wiring() -> None:
    objs = build(MANIFESTS / "base")
    dep = by_kind(objs, "Deployment")
    svc = by_kind(objs, "Service")
    pool = by_kind(objs, "InferencePool")
    route = by_kind(objs, "HTTPRoute")
    role = by_kind(objs, "Role")
    binding = by_kind(objs, "RoleBinding")
    sa = by_kind(objs, "ServiceAccount")
    cm = by_kind(objs, "ConfigMap")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]

    assert c["image"] == "ghcr.io/extproc/extproc:0.1.0"
    args = c["args"]
    assert args[0] == "serve"
    assert args[args.index("--pool") + 1] == pool["metadata"]["name"] == "vllm-llama3-8b"
    assert args[args.index("--namespace") + 1] == "$(POD_NAMESPACE)"
    assert any(e["name"] == "POD_NAMESPACE" and e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace" for e in c["env"])
    # the args parse with the real `extproc serve` parser
    from extproc.server.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(args[1:])
    assert ns.pool == "vllm-llama3-8b" and ns.grpc_port == 9002 and ns.health_port == 9003 and ns.metrics_port == 9090

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 9002, "grpc-health": 9003, "metrics": 9090}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "512Mi"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    # config file mounted from the ConfigMap, with the default profile's content
    config_path = args[args.index("--config") + 1]
    mount = next(m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    key = config_path[len(mount["mountPath"]) + 1 :]
    assert yaml.safe_load(cm["data"][key]) == yaml.safe_load((ROOT / "extproc/configs/default.yaml").read_text())

    # Service selects the Deployment and exposes the ext_proc port the pool points at
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == svc["metadata"]["name"] and ref["kind"] == "Service"
    assert ref["failureMode"] == "FailClose"
    assert any(p["port"] == ref["port"]["number"] == 9002 for p in svc["spec"]["ports"])
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]

    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["group"], backend["kind"], backend["name"]) == ("inference.networking.k8s.io", "InferencePool", "vllm-llama3-8b")

    # least privilege RBAC: read-only pods + inferencepools, namespaced, bound to the pod's ServiceAccount
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    rules = {(g, r): sorted(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {("", "pods"): ["get", "list", "watch"], ("inference.networking.k8s.io", "inferencepools"): ["get", "list", "watch"]}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]


def test_vllm_example_matches_the_pool() -> None:
    pool = by_kind(build(MANIFESTS / "base"), "InferencePool")
    dep = by_kind(build(MANIFESTS / "examples/vllm"), "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("vllm/vllm-openai:")
    assert "--enable-prefix-caching" in c["args"]
    kv = json.loads(c["args"][c["args"].index("--kv-events-config") + 1])
    assert kv["publisher"] == "zmq" and kv["endpoint"] == "tcp://*:5557" and kv["enable_kv_cache_events"] is True
    assert kv["topic"].startswith("kv@$(POD_IP):8000@")
    assert any(e["name"] == "POD_IP" and e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" for e in c["env"])
    assert any(p["containerPort"] == pool["spec"]["targetPorts"][0]["number"] for p in c["ports"])


def test_envoy_gateway_overlay() -> None:
    objs = build(MANIFESTS / "overlays/envoy-gateway")
    gw = by_kind(objs, "Gateway")
    route = by_kind(objs, "HTTPRoute")
    assert route["spec"]["parentRefs"][0]["name"] == gw["metadata"]["name"]
    ext = by_kind(objs, "EnvoyExtensionPolicy")
    svc = by_kind(objs, "Service", "vllm-llama3-8b-epp")
    backend = ext["spec"]["extProc"][0]["backendRefs"][0]
    assert backend["name"] == svc["metadata"]["name"] and backend["port"] == 9002
    assert ext["spec"]["extProc"][0]["processingMode"]["request"]["body"] == "Buffered"
    assert ext["spec"]["targetRefs"][0]["name"] == route["metadata"]["name"]
    assert ext["spec"]["extProc"][0]["failOpen"] is (by_kind(objs, "InferencePool")["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen")
    patch = by_kind(objs, "EnvoyPatchPolicy")
    cluster = next(p for p in patch["spec"]["jsonPatches"] if p["type"].endswith("Cluster"))["operation"]["value"]
    assert cluster["type"] == "ORIGINAL_DST" and cluster["lb_policy"] == "CLUSTER_PROVIDED"
    assert cluster["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"}
    listener = next(lst for lst in gw["spec"]["listeners"])
    route_cfg = next(p for p in patch["spec"]["jsonPatches"] if p["type"].endswith("RouteConfiguration"))
    assert route_cfg["name"] == f"default/{gw['metadata']['name']}/{listener['name']}"
    assert route_cfg["operation"]["value"] == cluster["name"]


def test_istio_overlay() -> None:
    objs = build(MANIFESTS / "overlays/istio")
    assert by_kind(objs, "Gateway")["spec"]["gatewayClassName"] == "istio"
    dr = by_kind(objs, "DestinationRule")
    svc = by_kind(objs, "Service", "vllm-llama3-8b-epp")
    assert dr["spec"]["host"] == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    # plaintext scheduler (no --tls-cert in the args) ⇒ no TLS origination to it
    args = by_kind(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ("--tls-cert" in args) == (dr["spec"]["trafficPolicy"]["tls"]["mode"] != "DISABLE")


def _envoy_cm(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(by_kind(objs, "ConfigMap", "extproc-envoy")["data"]["envoy.yaml"])


def test_plain_envoy_overlay_wiring() -> None:
    objs = build(MANIFESTS / "overlays/plain-envoy")
    assert not [o for o in objs if o["kind"] == "HTTPRoute"]
    assert by_kind(objs, "InferencePool")["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    boot = _envoy_cm(objs)
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    addr = lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]  # noqa: E731
    epp = by_kind(objs, "Service", "vllm-llama3-8b-epp")
    assert addr(clusters["extproc"]) == {"address": epp["metadata"]["name"], "port_value": 9002}
    fallback = by_kind(objs, "Service", "vllm-llama3-8b-fallback")
    assert addr(clusters["extproc_fallback"])["address"] == fallback["metadata"]["name"]
    assert fallback["spec"]["selector"].items() <= by_kind(build(MANIFESTS / "examples/vllm"), "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    assert clusters["extproc_original_dst"]["type"] == "ORIGINAL_DST"
    http_filters = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    main = next(f for f in http_filters if f["name"] == "extproc")
    assert main["typed_config"].get("failure_mode_allow") is True  # matches FailOpen
    dep = by_kind(objs, "Deployment", "extproc-envoy")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    listen = boot["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert any(p["containerPort"] == listen for p in c["ports"])
    assert c["args"][c["args"].index("--config-path") + 1] == "/etc/envoy/envoy.yaml"


def test_plain_envoy_bootstrap_is_current() -> None:
    """The ConfigMap holds exactly what `extproc envoy-config` renders for the flags in its header."""
    cm_text = (MANIFESTS / "overlays/plain-envoy/envoy-configmap.yaml").read_text()
    lines = cm_text.splitlines()
    first = next(i for i, line in enumerate(lines) if "extproc envoy-config" in line)
    flags = lines[first].split("extproc envoy-config", 1)[1].rstrip(" \\") + " " + lines[first + 1].lstrip("# ")
    out = subprocess.run(
        [sys.executable, "-m", "extproc", "envoy-config", *flags.split(), "--no-validate"], capture_output=True, text=True, check=True, timeout=120
    )
    assert yaml.safe_load(out.stdout) == _envoy_cm(build(MANIFESTS / "overlays/plain-envoy"))


@pytest.mark.envoy
def test_plain_envoy_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    from extproc.envoy_config import find_envoy_binary

    envoy = find_envoy_binary()
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(by_kind(build(MANIFESTS / "overlays/plain-envoy"), "ConfigMap", "extproc-envoy")["data"]["envoy.yaml"])
    r = subprocess.run([envoy, "--mode", "validate", "-c", str(cfg), "--log-level", "error"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pd_example_roles_sidecar_and_config() -> None:
    """The P/D example: prefill and decode Deployments labelled by role in the pool, the sidecar on the pool's
    port in front of the decode vLLM, NixlConnector everywhere, the scheduler running the shipped pd config."""
    objs = build(MANIFESTS / "examples/pd")
    pool = by_kind(objs, "InferencePool")
    port = pool["spec"]["targetPorts"][0]["number"]
    pre = by_kind(objs, "Deployment", "vllm-llama3-8b-prefill")
    dec = by_kind(objs, "Deployment", "vllm-llama3-8b-decode")
    for dep, role in ((pre, "prefill"), (dec, "decode")):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["llm-d.ai/role"] == role and pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    car, vllm = dec["spec"]["template"]["spec"]["containers"]
    assert car["args"][:5] == ["pd-sidecar", "--listen", f"0.0.0.0:{port}", "--upstream", "127.0.0.1:8200"]
    assert vllm["args"][vllm["args"].index("--port") + 1] == "8200"
    for c in (vllm, pre["spec"]["template"]["spec"]["containers"][0]):
        kt = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
        assert kt["kv_connector"] == "NixlConnector" and kt["kv_role"] == "kv_both"
    cm = by_kind(objs, "ConfigMap", "vllm-llama3-8b-epp-config")
    shipped = (Path(__file__).resolve().parents[3] / "extproc/configs/pd.yaml").read_text()
    assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load(shipped)
