"""``extproc config check FILE``: load a plugin config the way ``extproc serve`` does and print what would run.

For every scheduling profile: its filters, weighted scorers and picker (implicit ones included); then every plugin
instance with the type written in the file (the reference's, for an llm-d ``EndpointPickerConfig``), the extproc
type that runs it (or what an accepted always-on plugin maps to), and its effective parameters as the built
plugin holds them. Exit 0 when the file loads, 1 with the error (file, plugin, reason) when it does not. Nothing
is started: no sockets, no scrapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

_SIMPLE = (str, int, float, bool, type(None))


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="ACTION")
    c = sub.add_parser("check", help="load a config and print the resolved profiles and plugins", description=__doc__)
    c.add_argument("file", help="config YAML (an llm-d EndpointPickerConfig or extproc's shape) or a built-in profile name")
    c.add_argument("--json", action="store_true", help="print the report as JSON")


def _value(v: Any, depth: int = 0) -> Any:
    if isinstance(v, _SIMPLE):
        return v
    if depth < 2 and isinstance(v, (list, tuple, frozenset, set)):
        items = [_value(x, depth + 1) for x in (sorted(v, key=str) if isinstance(v, (set, frozenset)) else v)]
        return items if all(x is not _SKIP for x in items) else _SKIP
    if depth < 2 and isinstance(v, dict):
        out = {str(k): _value(x, depth + 1) for k, x in v.items()}
        return out if all(x is not _SKIP for x in out.values()) else _SKIP
    return _SKIP


_SKIP = object()


def effective_parameters(plugin: Any) -> dict[str, Any]:
    """The built plugin's public, plain-valued attributes (its effective configuration)."""
    names: list[str] = []
    for cls in type(plugin).__mro__:
        names += [n for n in getattr(cls, "__slots__", ()) if isinstance(n, str)]
    names += list(getattr(plugin, "__dict__", {}))
    out: dict[str, Any] = {}
    for n in dict.fromkeys(names):
        if n.startswith("_") or n in ("name", "active", "inactive_reason"):
            continue
        try:
            v = _value(getattr(plugin, n))
        except AttributeError:
            continue
        if v is not _SKIP:
            out[n] = v
    return out


def report(path: str) -> dict[str, Any]:
    from extproc.datalayer.endpoint import EndpointPool
    from extproc.plugin import roles_of
    from extproc.scheduling.config import load_config

    cfg = load_config(path, EndpointPool(), {})
    sched = cfg.scheduler
    raw = cfg.raw if isinstance(cfg.raw, dict) else {}
    profiles = []
    for name, prof in sched.profiles.items():
        profiles.append(
            {
                "name": name,
                "filters": [f.name for f in prof.filters],
                "scorers": [{"plugin": ws.scorer.name, "weight": ws.weight} for ws in prof.scorers],
                "picker": prof.picker.name,
            }
        )
    plugins = []
    for name, o in cfg.origins.items():
        inst = cfg.plugins.get(name)
        entry: dict[str, Any] = {
            "name": name,
            "type": o.reference_type or o.extproc_type,
            "runs_as": o.extproc_type or "(accepted: always on)",
        }
        if o.note:
            entry["maps_to"] = o.note
        if o.parameters:
            entry["parameters_in_file"] = o.parameters
        if inst is not None:
            entry["roles"] = sorted(roles_of(inst))
            entry["effective_parameters"] = effective_parameters(inst)
            if getattr(inst, "active", True) is False:
                entry["inactive"] = getattr(inst, "inactive_reason", "inactive")
        plugins.append(entry)
    return {
        "file": cfg.path,
        "apiVersion": raw.get("apiVersion", "(extproc shape)"),
        "featureGates": cfg.feature_gates,
        "profileHandler": {"name": sched.handler.name, "type": sched.handler.type_name, "ownedHeaders": list(sched.owned_headers)},
        "profiles": profiles,
        "admitters": [a.name for a in sched.admitters],
        "plugins": plugins,
        "fairness": {str(k): getattr(v, "name", str(v)) for k, v in cfg.fairness.items()},
        "usageLimitPolicy": getattr(cfg.usage_limit, "name", None),
        "saturationDetector": cfg.saturation,
        "flowControl": cfg.flow_control,
    }


def _print_text(r: dict[str, Any]) -> None:
    print(f"config OK: {r['file']}  (apiVersion {r['apiVersion']})")
    if r["featureGates"]:
        print(f"feature gates: {', '.join(f'{k}={v}' for k, v in r['featureGates'].items())}")
    h = r["profileHandler"]
    print(f"profile handler: {h['name']} ({h['type']})" + (f", sets {', '.join(h['ownedHeaders'])}" if h["ownedHeaders"] else ""))
    for p in r["profiles"]:
        scorers = ", ".join(f"{s['plugin']}×{s['weight']:g}" for s in p["scorers"]) or "none"
        print(f"profile '{p['name']}': filters [{', '.join(p['filters'])}] → scorers [{scorers}] → picker {p['picker']}")
    if r["admitters"]:
        print(f"admitters: {', '.join(r['admitters'])}")
    print("plugins:")
    for e in r["plugins"]:
        line = f"  {e['name']}: type {e['type']} → {e['runs_as']}"
        if e.get("roles"):
            line += f" [{', '.join(e['roles'])}]"
        print(line)
        if e.get("maps_to"):
            print(f"      maps to: {e['maps_to']}")
        if e.get("inactive"):
            print(f"      INACTIVE: {e['inactive']}")
        if e.get("effective_parameters"):
            print(f"      effective: {json.dumps(e['effective_parameters'], sort_keys=True)}")
    if r["fairness"]:
        print(f"flow-control fairness: {', '.join(f'band {k}: {v}' for k, v in r['fairness'].items())}")
    if r["usageLimitPolicy"]:
        print(f"flow-control usage limit: {r['usageLimitPolicy']}")
    if r["saturationDetector"]:
        print(f"saturation detector: {json.dumps(r['saturationDetector'], sort_keys=True)}")
    if r["flowControl"]:
        print(f"flow control: {json.dumps(r['flowControl'], sort_keys=True)}")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "config_command", None) != "check":
        print("usage: extproc config check FILE [--json]", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from extproc.scheduling.config import ConfigError

    try:
        r = report(args.file)
    except ConfigError as e:
        print(f"extproc: config error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True, default=str))
    else:
        _print_text(r)
    return 0
