"""The benchmark setups (names are contracts) and what each one runs.

- ``envoy-rr`` / ``envoy-lr``: Envoy alone with its ROUND_ROBIN / LEAST_REQUEST load balancer (no scheduler).
- ``extproc-*``: Envoy + the extproc scheduler with a shipped config profile.
- ``vllm-router-*`` / ``sglang-router-*``: the peers' own Rust proxies (see ``peers.py``).
- ``extproc:PATH``: Envoy + the extproc scheduler with any config file (an llm-d ``EndpointPickerConfig`` or
  extproc's shape), so a user's own config runs side by side with ours and the peers'. The setup's name in the
  report is ``extproc:PATH`` as given.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.bench import peers


@dataclass(slots=True, frozen=True)
class SetupSpec:
    name: str
    kind: str  # "envoy" | "extproc" | "peer"
    lb_policy: str | None = None  # envoy
    config: str | None = None  # extproc: built-in config name
    kv_events: bool = False  # extproc-precise: the fleet must publish KV events
    pd: bool = False  # P/D: the fleet is split into prefill- and decode-role pods (NixlConnector on all)
    replicas: int = 1  # extproc: active-active scheduler replicas behind Envoy's ext_proc cluster (Redis-shared)


SETUPS: dict[str, SetupSpec] = {
    "envoy-rr": SetupSpec("envoy-rr", "envoy", lb_policy="ROUND_ROBIN"),
    "envoy-lr": SetupSpec("envoy-lr", "envoy", lb_policy="LEAST_REQUEST"),
    "extproc-random": SetupSpec("extproc-random", "extproc", config="random"),
    "extproc-default": SetupSpec("extproc-default", "extproc", config="default"),
    "extproc-prefix-load": SetupSpec("extproc-prefix-load", "extproc", config="prefix-load"),
    "extproc-load-only": SetupSpec("extproc-load-only", "extproc", config="load-only"),
    "extproc-precise": SetupSpec("extproc-precise", "extproc", config="precise-prefix", kv_events=True),
    "extproc-precise-gpu-only": SetupSpec(
        "extproc-precise-gpu-only", "extproc", config="precise-prefix-gpu-only", kv_events=True
    ),
    "extproc-approx-111": SetupSpec("extproc-approx-111", "extproc", config="approx-111"),
    "extproc-predicted": SetupSpec("extproc-predicted", "extproc", config="predicted-latency"),
    "extproc-pd": SetupSpec("extproc-pd", "extproc", config="pd", pd=True),
    "extproc-pd-predicted": SetupSpec("extproc-pd-predicted", "extproc", config="pd-predicted", pd=True),
    **{name: SetupSpec(name, "peer", pd=spec.pd) for name, spec in peers.PEERS.items()},
}

DEFAULT_SETUPS = ("envoy-rr", "envoy-lr", "extproc-random", "extproc-default", "extproc-prefix-load")


PATH_PREFIX = "extproc:"
KV_EVENT_TYPES = ("precise-prefix-cache", "precise-prefix-cache-producer")
PD_TYPES = ("disagg-profile-handler",)  # a config with one splits prefill from decode


def path_setup(name: str) -> SetupSpec:
    """``extproc:PATH`` → an extproc setup running that config file (ValueError if it is missing or not YAML)."""
    import os

    import yaml

    path = name[len(PATH_PREFIX) :]
    if not path:
        raise ValueError("setup 'extproc:' needs a config path (extproc:PATH)")
    if not os.path.isfile(path):
        raise ValueError(f"setup {name!r}: no such config file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"setup {name!r}: cannot read {path!r}: {e}") from None
    plugins = raw.get("plugins") if isinstance(raw, dict) else None
    types = {p.get("type") for p in plugins or [] if isinstance(p, dict)}
    return SetupSpec(name, "extproc", config=path, kv_events=bool(types & set(KV_EVENT_TYPES)), pd=bool(types & set(PD_TYPES)))


def parse_setups(spec: str) -> list[SetupSpec]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(SETUPS.values())
    unknown = [n for n in names if n not in SETUPS and not n.startswith(PATH_PREFIX)]
    if unknown:
        raise ValueError(f"unknown setup(s) {', '.join(unknown)} (known: {', '.join(SETUPS)}, extproc:PATH, or 'all')")
    if not names:
        raise ValueError("no setups given")
    return [path_setup(n) if n.startswith(PATH_PREFIX) else SETUPS[n] for n in dict.fromkeys(names)]


REPLICAS_SUFFIX = "@r"


def with_replicas(setups: list[SetupSpec], counts: list[int]) -> list[SetupSpec]:
    """``--replicas 1,2,3``: every extproc setup once per replica count, side by side in one report. A count of 1
    keeps the setup's name; N > 1 runs it as ``<name>@rN`` (N ``extproc serve`` replicas sharing state through
    Redis, docs/active-active.md). Other setups run once."""
    import dataclasses

    if not counts or any(n < 1 for n in counts):
        raise ValueError("--replicas: counts must be >= 1")
    out: list[SetupSpec] = []
    for s in setups:
        if s.kind != "extproc":
            out.append(s)
            continue
        for n in dict.fromkeys(counts):
            out.append(s if n == 1 else dataclasses.replace(s, name=f"{s.name}{REPLICAS_SUFFIX}{n}", replicas=n))
    return out


def config_available(config: str) -> str | None:
    """None if the built-in config exists and its plugins build, else why not."""
    from extproc.datalayer.endpoint import EndpointPool
    from extproc.scheduling.config import ConfigError, load_config

    try:
        load_config(config, EndpointPool())
    except ConfigError as e:
        return f"config '{config}' is not available: {e.reason}"
    except Exception as e:  # a plugin failing to build for another reason: report it, never drop the setup
        return f"config '{config}' failed to build: {type(e).__name__}: {e}"
    return None
