"""Kubernetes endpoint discovery: an InferencePool (or a plain label selector) and the Pods it selects.

Two modes, both keeping an :class:`~extproc.datalayer.endpoint.EndpointPool` current without a restart:

* **InferencePool** (``--pool NAME``): watch ``inferencepools.inference.networking.k8s.io/v1`` ``NAME`` in the
  namespace; its ``spec.selector.matchLabels`` picks the Pods, ``spec.targetPorts[].number`` the ports, and
  ``spec.endpointPickerRef.failureMode`` (FailOpen / FailClose, CRD default FailClose) is exposed as
  :attr:`KubernetesDiscovery.failure_mode`. A selector change restarts the Pod watch with the new selector.
* **Standalone** (``--endpoint-selector k=v --target-ports 8000``): no CRD needed, only Pods.

Each watched resource runs a small reflector: LIST (paginated) → WATCH from the list's ``resourceVersion`` with
``allowWatchBookmarks``; a dropped stream resumes from the last seen version; ``410 Gone`` (an HTTP status or an
``ERROR`` event) forces a fresh LIST that replaces the cache in one step; other errors back off exponentially with
full jitter. Objects are kept as raw JSON dicts (no model deserialisation on the event path).

A Pod is an endpoint when it is Running, has a ``podIP``, carries no ``deletionTimestamp`` and has the condition
``Ready=True``; its endpoints are ``podIP:port`` for every target port (see :func:`pod_is_ready`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.datalayer.endpoint import EndpointPool

log = logging.getLogger(__name__)

__all__ = [
    "POOL_GROUP",
    "POOL_VERSION",
    "POOL_PLURAL",
    "POD_CLASS_LABELS",
    "Backoff",
    "DiscoveryConfig",
    "DiscoveryError",
    "KubernetesDiscovery",
    "PoolSpec",
    "add_discovery_arguments",
    "discovery_from_args",
    "endpoints_for_pods",
    "format_selector",
    "parse_pool",
    "parse_selector",
    "parse_target_ports",
    "pod_is_ready",
    "selector_matches",
]

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
FAIL_CLOSE = "FailClose"
FAIL_OPEN = "FailOpen"
# Pod labels that name the endpoint's pod class (used by class-aware filters); the first present wins.
POD_CLASS_LABELS: tuple[str, ...] = ("pod-class", "extproc.io/pod-class", "llm-d.ai/role", "accelerator")
SERVICEACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
LIST_PAGE_SIZE = 500


class DiscoveryError(ValueError):
    """Bad discovery flags or an unusable InferencePool spec."""


class _Gone(Exception):
    """The watch's resourceVersion is too old (410 Gone): re-list."""


# ---------------------------------------------------------------------------------------------
# pure helpers (readiness rules, selectors, pool spec)


def parse_selector(text: str) -> dict[str, str]:
    """``k=v[,k2=v2]`` → ``{k: v, k2: v2}`` (equality-only, like InferencePool ``matchLabels``)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if value.startswith("="):  # k==v
            value = value[1:].strip()
        if not sep or not key or key.endswith("!"):
            raise DiscoveryError(f"selector term {part!r}: expected key=value")
        out[key] = value
    if not out:
        raise DiscoveryError(f"empty selector {text!r}")
    return out


def format_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_target_ports(text: str) -> tuple[int, ...]:
    ports: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise DiscoveryError(f"target port {part!r}: expected 1..65535")
        ports.append(int(part))
    if not ports:
        raise DiscoveryError(f"no target ports in {text!r}")
    return tuple(dict.fromkeys(ports))


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """The endpoint rule: Running, has a podIP, not terminating, condition Ready=True."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _pod_class(labels: Mapping[str, str]) -> str:
    for key in POD_CLASS_LABELS:
        value = labels.get(key)
        if value:
            return value
    return "default"


def endpoints_for_pods(
    pods: Mapping[str, Mapping[str, Any]], selector: Mapping[str, str], ports: tuple[int, ...]
) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Addresses (pod IP × target port, sorted by pod name) and per-address labels for ``EndpointPool.set_endpoints``."""
    addresses: list[str] = []
    labels: dict[str, dict[str, str]] = {}
    for name in sorted(pods):
        pod = pods[name]
        pod_labels: dict[str, str] = dict((pod.get("metadata") or {}).get("labels") or {})
        if not selector_matches(selector, pod_labels) or not pod_is_ready(pod):
            continue
        ip = pod["status"]["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        ep_labels = dict(pod_labels)
        ep_labels["pod-class"] = _pod_class(pod_labels)
        for port in ports:
            addr = f"{host}:{port}"
            addresses.append(addr)
            labels[addr] = ep_labels
    return addresses, labels


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What discovery needs from an InferencePool (``inference.networking.k8s.io/v1``)."""

    selector: dict[str, str]
    target_ports: tuple[int, ...]
    failure_mode: str = FAIL_CLOSE
    picker_service: str = ""
    picker_port: int = 0


def parse_pool(obj: Mapping[str, Any]) -> PoolSpec:
    spec = obj.get("spec") or {}
    match_labels = (spec.get("selector") or {}).get("matchLabels") or {}
    if not isinstance(match_labels, dict) or not match_labels:
        raise DiscoveryError("InferencePool spec.selector.matchLabels is empty")
    ports: list[int] = []
    for p in spec.get("targetPorts") or ():
        number = p.get("number") if isinstance(p, dict) else None
        if not isinstance(number, int) or not 1 <= number <= 65535:
            raise DiscoveryError(f"InferencePool spec.targetPorts entry {p!r}: number must be 1..65535")
        ports.append(number)
    if not ports:
        raise DiscoveryError("InferencePool spec.targetPorts is empty")
    ref = spec.get("endpointPickerRef") or {}
    mode = ref.get("failureMode") or FAIL_CLOSE
    if mode not in (FAIL_OPEN, FAIL_CLOSE):
        raise DiscoveryError(f"InferencePool endpointPickerRef.failureMode {mode!r}: expected FailOpen or FailClose")
    port = (ref.get("port") or {}).get("number", 0)
    return PoolSpec(
        selector={str(k): str(v) for k, v in match_labels.items()},
        target_ports=tuple(dict.fromkeys(ports)),
        failure_mode=mode,
        picker_service=str(ref.get("name") or ""),
        picker_port=int(port or 0),
    )


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: sleep U(0, min(cap, base·2^n))."""

    base_s: float = 0.2
    cap_s: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


# ---------------------------------------------------------------------------------------------
# reflector: LIST + WATCH of one resource, kept as raw dicts

ListCall = Callable[..., Awaitable[Any]]  # a kubernetes_asyncio list_* method; called with _preload_content=False


class _Reflector:
    """Keeps ``objects`` (name → raw object) equal to the API server's view of one listed resource.

    ``on_change()`` runs after every applied change and after every (re-)list; it is synchronous and runs on the
    event loop, so pool updates never interleave with scheduling.
    """

    def __init__(
        self,
        kind: str,
        list_call: ListCall,
        list_kwargs: dict[str, Any],
        on_change: Callable[[], None],
        backoff: Backoff,
        watch_timeout_s: int,
    ) -> None:
        self.kind = kind
        self._list_call = list_call
        self._kwargs = list_kwargs
        self._on_change = on_change
        self._backoff = backoff
        self._watch_timeout_s = watch_timeout_s
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.lists = 0  # full LISTs done (initial + re-lists), for observability and tests
        self.watches = 0

    async def run(self) -> None:
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    self._backoff.reset()
                await self._watch()
                # the server closed the stream (timeout or dropped connection): resume from the last version
            except asyncio.CancelledError:
                raise
            except _Gone:
                log.info("k8s %s watch: resourceVersion %s expired (410 Gone), re-listing", self.kind, self.resource_version)
                need_list = True
            except Exception as e:  # noqa: BLE001 - any API/transport error: back off and retry
                delay = self._backoff.next_delay()
                log.warning(
                    "k8s %s list/watch failed, retrying in %.2fs: %s",
                    self.kind,
                    delay,
                    _describe(e),
                    extra={"kind": self.kind, "retry_in_s": round(delay, 3)},
                )
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        items: dict[str, dict[str, Any]] = {}
        cont = ""
        rv = ""
        while True:
            kwargs = dict(self._kwargs, limit=LIST_PAGE_SIZE, _preload_content=False)
            if cont:
                kwargs["_continue"] = cont
            resp = await _open(self._list_call, kwargs)
            try:
                body = json.loads(await resp.read())
            finally:
                resp.release()
            for obj in body.get("items") or ():
                name = (obj.get("metadata") or {}).get("name")
                if name:
                    items[name] = obj
            meta = body.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            cont = meta.get("continue") or ""
            if not cont:
                break
        self.objects = items
        self.resource_version = rv
        self.lists += 1
        log.debug("k8s %s listed %d objects at resourceVersion %s", self.kind, len(items), rv)
        self.synced.set()
        self._on_change()

    async def _watch(self) -> None:
        timeout = self._watch_timeout_s + random.randint(0, max(1, self._watch_timeout_s // 5))
        resp = await _open(
            self._list_call,
            dict(
                self._kwargs,
                watch=True,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _preload_content=False,
                _request_timeout=timeout + 30,
            ),
        )
        self.watches += 1
        self._backoff.reset()
        try:
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                self._apply(json.loads(line))
        finally:
            resp.release()

    def _apply(self, event: Mapping[str, Any]) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Gone()
            raise RuntimeError(f"watch ERROR event: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        rv = meta.get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        name = meta.get("name")
        if not name:
            return
        if etype in ("ADDED", "MODIFIED"):
            self.objects[name] = dict(obj)
        elif etype == "DELETED":
            self.objects.pop(name, None)
        else:
            log.debug("k8s %s: ignoring watch event type %r", self.kind, etype)
            return
        if rv:
            self.resource_version = str(rv)
        self._on_change()


async def _open(call: ListCall, kwargs: dict[str, Any]) -> Any:
    """Call a list method without preloading; non-2xx answers become ``ApiException`` (410 → ``_Gone``)."""
    from kubernetes_asyncio.client.exceptions import ApiException

    resp = await call(**kwargs)
    if 200 <= resp.status <= 299:
        return resp
    try:
        body = await resp.read()
    finally:
        resp.release()
    if resp.status == 410:
        raise _Gone()
    raise ApiException(status=resp.status, reason=f"{resp.reason}: {body[:200].decode('utf-8', 'replace')}")


def _describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status is not None:
        return f"{type(e).__name__} {status} {reason or ''}".strip()
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# discovery


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    namespace: str
    pool_name: str | None = None  # InferencePool mode
    selector: dict[str, str] = field(default_factory=dict)  # standalone mode
    target_ports: tuple[int, ...] = ()  # standalone mode
    kubeconfig: str | None = None
    in_cluster: bool = False
    context: str | None = None
    initial_sync_timeout_s: float = 30.0
    watch_timeout_s: int = 300
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.namespace:
            raise DiscoveryError("namespace is required")
        if self.pool_name:
            if self.selector or self.target_ports:
                raise DiscoveryError("--pool takes selector and ports from the InferencePool: drop --endpoint-selector/--target-ports")
        else:
            if not self.selector:
                raise DiscoveryError("standalone discovery needs --endpoint-selector")
            if not self.target_ports:
                raise DiscoveryError("standalone discovery needs --target-ports")
        if self.in_cluster and self.kubeconfig:
            raise DiscoveryError("--in-cluster and --kubeconfig are exclusive")


class KubernetesDiscovery:
    """Keeps ``pool`` equal to the Ready pods of an InferencePool (or a label selector) × target ports."""

    def __init__(self, cfg: DiscoveryConfig, pool: EndpointPool, api_client: Any | None = None) -> None:
        self.cfg = cfg
        self.pool = pool
        self._api_client = api_client
        self._owns_client = api_client is None
        self._tasks: list[asyncio.Task[None]] = []
        self._pod_task: asyncio.Task[None] | None = None
        self._pod_reflector: _Reflector | None = None
        self._pool_reflector: _Reflector | None = None
        self._rng = random.Random()
        self.selector: dict[str, str] = dict(cfg.selector)
        self.target_ports: tuple[int, ...] = tuple(cfg.target_ports)
        # FailOpen / FailClose from the InferencePool's endpointPickerRef; None in standalone mode / before sync.
        self.failure_mode: str | None = None
        self.pool_present = cfg.pool_name is None
        self.synced = asyncio.Event()
        self.updates = 0  # times the endpoint set was re-applied

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        if self._api_client is None:
            self._api_client = await _make_api_client(self.cfg)
        from kubernetes_asyncio import client

        if self.cfg.pool_name:
            custom = client.CustomObjectsApi(self._api_client)
            self._pool_reflector = _Reflector(
                f"inferencepool/{self.cfg.namespace}/{self.cfg.pool_name}",
                custom.list_namespaced_custom_object,
                {
                    "group": POOL_GROUP,
                    "version": POOL_VERSION,
                    "namespace": self.cfg.namespace,
                    "plural": POOL_PLURAL,
                    "field_selector": f"metadata.name={self.cfg.pool_name}",
                },
                self._on_pool_change,
                self._backoff(),
                self.cfg.watch_timeout_s,
            )
            self._tasks.append(asyncio.create_task(self._pool_reflector.run(), name="k8s-inferencepool-watch"))
        else:
            self._restart_pod_watch()
        log.info(
            "kubernetes discovery started",
            extra={
                "namespace": self.cfg.namespace,
                "pool": self.cfg.pool_name,
                "selector": format_selector(self.selector) if self.selector else None,
                "target_ports": list(self.target_ports),
            },
        )
        try:
            await asyncio.wait_for(self.synced.wait(), self.cfg.initial_sync_timeout_s)
        except TimeoutError:
            log.warning(
                "kubernetes discovery: no initial sync after %.0fs; serving with %d endpoints and still trying",
                self.cfg.initial_sync_timeout_s,
                len(self.pool),
            )

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if self._pod_task is not None:
            tasks.append(self._pod_task)
        self._tasks.clear()
        self._pod_task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._owns_client and self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    # -- internals -------------------------------------------------------------------------------

    def _backoff(self) -> Backoff:
        return Backoff(self.cfg.backoff_base_s, self.cfg.backoff_cap_s, rng=self._rng)

    def _restart_pod_watch(self) -> None:
        if self._pod_task is not None:
            self._pod_task.cancel()
            self._pod_task = None
        from kubernetes_asyncio import client

        core = client.CoreV1Api(self._api_client)
        label_selector = format_selector(self.selector)
        self._pod_reflector = _Reflector(
            f"pods/{self.cfg.namespace}[{label_selector}]",
            core.list_namespaced_pod,
            {"namespace": self.cfg.namespace, "label_selector": label_selector},
            self._apply_endpoints,
            self._backoff(),
            self.cfg.watch_timeout_s,
        )
        self._pod_task = asyncio.create_task(self._pod_reflector.run(), name="k8s-pod-watch")

    def _on_pool_change(self) -> None:
        assert self._pool_reflector is not None
        obj = self._pool_reflector.objects.get(self.cfg.pool_name or "")
        if obj is None:
            if self.pool_present or not self.synced.is_set():
                log.warning(
                    "InferencePool %s/%s not found: no endpoints until it exists", self.cfg.namespace, self.cfg.pool_name
                )
            self.pool_present = False
            if self._pod_task is not None:
                self._pod_task.cancel()
                self._pod_task = None
            self._pod_reflector = None
            self.selector = {}
            self.target_ports = ()
            self.pool.set_endpoints([])
            self.updates += 1
            self.synced.set()  # synced to "no pool": serving 503s is the correct answer
            return
        try:
            spec = parse_pool(obj)
        except DiscoveryError as e:
            log.error("InferencePool %s/%s rejected, keeping the previous spec: %s", self.cfg.namespace, self.cfg.pool_name, e)
            return
        self.pool_present = True
        if spec.failure_mode != self.failure_mode:
            log.info(
                "InferencePool %s/%s endpointPickerRef.failureMode=%s",
                self.cfg.namespace,
                self.cfg.pool_name,
                spec.failure_mode,
                extra={"failure_mode": spec.failure_mode, "pool": self.cfg.pool_name},
            )
            self.failure_mode = spec.failure_mode
        ports_changed = spec.target_ports != self.target_ports
        selector_changed = spec.selector != self.selector or self._pod_task is None
        self.target_ports = spec.target_ports
        if selector_changed:
            log.info(
                "InferencePool %s/%s selector %s, target ports %s",
                self.cfg.namespace,
                self.cfg.pool_name,
                format_selector(spec.selector),
                ",".join(map(str, spec.target_ports)),
            )
            self.selector = dict(spec.selector)
            # Filter the pods already known by the new selector right away (pods leaving the pool stop being picked
            # now), then re-list with the new selector.
            self._apply_endpoints()
            self._restart_pod_watch()
        elif ports_changed:
            log.info("InferencePool %s/%s target ports %s", self.cfg.namespace, self.cfg.pool_name, ",".join(map(str, spec.target_ports)))
            self._apply_endpoints()

    def _apply_endpoints(self) -> None:
        reflector = self._pod_reflector
        pods = reflector.objects if reflector is not None else {}
        addresses, labels = endpoints_for_pods(pods, self.selector, self.target_ports)
        before = len(self.pool)
        self.pool.set_endpoints(addresses, labels)
        self.updates += 1
        if len(self.pool) != before:
            log.info("kubernetes discovery: %d endpoints", len(self.pool), extra={"endpoints": len(self.pool)})
        if reflector is not None and reflector.synced.is_set():
            self.synced.set()

    @property
    def stats(self) -> dict[str, int]:
        out = {"endpoints": len(self.pool), "updates": self.updates}
        if self._pod_reflector is not None:
            out["pod_lists"] = self._pod_reflector.lists
            out["pod_watches"] = self._pod_reflector.watches
        if self._pool_reflector is not None:
            out["pool_lists"] = self._pool_reflector.lists
            out["pool_watches"] = self._pool_reflector.watches
        return out


async def _make_api_client(cfg: DiscoveryConfig) -> Any:
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    if cfg.in_cluster or (cfg.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG")):
        config.load_incluster_config(client_configuration=configuration)
        how = "in-cluster"
    else:
        await config.load_kube_config(config_file=cfg.kubeconfig, context=cfg.context, client_configuration=configuration)
        how = f"kubeconfig {cfg.kubeconfig or '(default)'}"
    log.info("kubernetes API %s via %s", configuration.host, how)
    return client.ApiClient(configuration=configuration)


# ---------------------------------------------------------------------------------------------
# CLI glue (extproc serve)


def _default_namespace() -> str:
    env = os.environ.get("POD_NAMESPACE")
    if env:
        return env
    try:
        with open(SERVICEACCOUNT_NAMESPACE_FILE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def add_discovery_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kubernetes discovery")
    g.add_argument("--pool", default=None, help="InferencePool name to watch (inference.networking.k8s.io/v1)")
    g.add_argument("--namespace", default=None, help="namespace of the pool and its pods (default: $POD_NAMESPACE, the service account's, or 'default')")
    g.add_argument("--endpoint-selector", default=None, help="standalone mode without the CRD: pod label selector k=v[,k2=v2]")
    g.add_argument("--target-ports", default=None, help="standalone mode: model-server ports on each pod, 8000[,8001]")
    g.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster when running in a pod, else ~/.kube/config)")
    g.add_argument("--kube-context", default=None, help="kubeconfig context")
    g.add_argument("--in-cluster", action="store_true", help="use the pod's service account")
    g.add_argument("--discovery-sync-timeout", type=float, default=30.0, help="seconds start-up waits for the first pod list")


def discovery_from_args(args: argparse.Namespace, pool: EndpointPool) -> KubernetesDiscovery | None:
    pool_name = getattr(args, "pool", None)
    selector_text = getattr(args, "endpoint_selector", None)
    ports_text = getattr(args, "target_ports", None)
    if not pool_name and not selector_text and not ports_text:
        return None
    if getattr(args, "endpoints", "") or getattr(args, "endpoints_file", None):
        raise SystemExit("extproc: --endpoints/--endpoints-file and Kubernetes discovery are exclusive")
    try:
        cfg = DiscoveryConfig(
            namespace=getattr(args, "namespace", None) or _default_namespace(),
            pool_name=pool_name or None,
            selector=parse_selector(selector_text) if selector_text else {},
            target_ports=parse_target_ports(ports_text) if ports_text else (),
            kubeconfig=getattr(args, "kubeconfig", None),
            in_cluster=bool(getattr(args, "in_cluster", False)),
            context=getattr(args, "kube_context", None),
            initial_sync_timeout_s=float(getattr(args, "discovery_sync_timeout", 30.0)),
        )
    except DiscoveryError as e:
        raise SystemExit(f"extproc: {e}") from None
    return KubernetesDiscovery(cfg, pool)
