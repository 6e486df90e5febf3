"""The benchmark setups (names are contracts) and what each one runs.

- ``envoy-rr`` / ``envoy-lr``: Envoy alone with its ROUND_ROBIN / LEAST_REQUEST load balancer (no scheduler).
- ``extproc-*``: Envoy + the extproc scheduler with a shipped config profile.
- ``vllm-router-*`` / ``sglang-router-*``: the peers' own Rust proxies (see ``peers.py``).
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
    **{name: SetupSpec(name, "peer") for name in peers.PEERS},
}

DEFAULT_SETUPS = ("envoy-rr", "envoy-lr", "extproc-random", "extproc-default", "extproc-prefix-load")


def parse_setups(spec: str) -> list[SetupSpec]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(SETUPS.values())
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        raise ValueError(f"unknown setup(s) {', '.join(unknown)} (known: {', '.join(SETUPS)}, or 'all')")
    if not names:
        raise ValueError("no setups given")
    return [SETUPS[n] for n in dict.fromkeys(names)]


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
