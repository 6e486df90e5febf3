"""The ``extproc plan`` SPEC: workload, SLOs, search space and budget, read from YAML and validated field by field.

Every problem is a :class:`SpecError` naming the file, the field (a dotted path such as
``search.pods.llama3-8b-l40s.cost_per_hour``) and the reason; nothing is silently defaulted or dropped (an
unknown key is an error, so a typo never turns into "the default").

```yaml
name: three-vendor                     # optional, for the report
seed: 0                                # trace and simulator seed: same seed -> same pareto.json
workload:
  kv_blocks: 600                       # optional per-pod KV-block override (as ``extproc bench --kv-blocks``)
  classes:                             # one or more traffic classes, merged into one trace by arrival time
    - name: interactive                # sent as x-gateway-inference-objective; SLOs are keyed by it
      priority: 10                     # the objective's priority in every candidate's config (< 0: sheddable)
      workload: shared-prefix          # one of ours (``extproc bench --workload``) ...
      stages: "6:30"                   # RATE:SECONDS,... Poisson stages
    - name: batch
      priority: -1
      lengths:                         # ... or length distributions at Poisson rates ...
        input_tokens: {mean: 1200, sigma: 0.5, min: 64, max: 3000}   # log-normal (sigma 0: constant)
        output_tokens: 200             # an int: constant
        prefix_groups: 4               # optional: prompts start with one of N shared prefixes ...
        prefix_tokens: 800             # ... of this many tokens
      stages: "3:30"
    # - name: replay
    #   trace: arrivals.jsonl          # ... or a trace file: one JSON object a line, see ``load_trace``
slos:                                  # per class: latency percentiles (ms) of completed requests, success rate
  interactive: {ttft_p90_ms: 400, itl_p90_ms: 60}
  batch: {e2e_p90_ms: 30000, success_rate: 0.8}
search:
  pods:                                # per accelerator profile: the pod counts to try and a cost per pod-hour
    llama3-8b-mi300x: {counts: [0, 1, 2], cost_per_hour: 4.5}
    llama3-8b-l40s: {counts: [0, 2, 4], cost_per_hour: 1.2}
  pd_prefill: [0, 1]                   # 0: aggregated; N: the first N pods (in the order above) are prefill-role
  pd_routing: pd                       # the config P/D candidates run (default: the built-in ``pd``)
  max_num_seqs: [64, 256]              # vLLM limits applied to every pod (absent: each profile's own)
  max_num_batched_tokens: [2048, 8192]
  routing: [default, prefix-load, ./my-config.yaml]   # built-in names or YAML paths (relative to this file)
  admission:                           # top-level saturationDetector keys of the candidate's config
    maxInflightPerPod: [0, 8]
    queueDepthThreshold: [1, 5]
budget: 240                            # candidates to evaluate (the whole grid if it is smaller)
method: auto                           # auto (grid if the grid fits the budget, else optuna) | grid | optuna | random
```
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

METHODS = ("auto", "grid", "optuna", "random")
ADMISSION_KEYS = ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThresholdSeconds", "maxInflightPerPod")
SLO_RE = re.compile(r"^(ttft|itl|e2e)_p(\d{1,2}(?:\.\d+)?)_ms$")
MAX_GRID = 10_000_000  # grids beyond this are never enumerated (use optuna / random)


class SpecError(ValueError):
    """A bad SPEC: which file, which field, why."""

    def __init__(self, path: str, field_: str, reason: str) -> None:
        self.path = path
        self.field = field_
        self.reason = reason
        super().__init__(f"{path}: {field_ or '(top level)'}: {reason}")


@dataclass(slots=True, frozen=True)
class Lengths:
    """A token-count distribution: log-normal with this mean (sigma 0 = constant), clipped to [min, max]."""

    mean: float
    sigma: float = 0.0
    min: int = 1
    max: int = 8192


@dataclass(slots=True)
class TrafficClass:
    name: str
    priority: int
    stages: str = ""  # RATE:SECONDS,... (workload / lengths)
    workload: str = ""  # one of ours
    lengths_in: Lengths | None = None
    lengths_out: Lengths | None = None
    prefix_groups: int = 0
    prefix_tokens: int = 0
    trace: str = ""  # absolute path of a trace file


@dataclass(slots=True, frozen=True)
class SLO:
    metric: str  # ttft | itl | e2e | success_rate
    percentile: float  # 0 for success_rate
    target: float  # ms, or the minimum success rate

    @property
    def key(self) -> str:
        if self.metric == "success_rate":
            return "success_rate"
        p = int(self.percentile) if float(self.percentile).is_integer() else self.percentile
        return f"{self.metric}_p{p}_ms"


@dataclass(slots=True, frozen=True)
class PodOption:
    profile: str
    counts: tuple[int, ...]
    cost_per_hour: float


@dataclass(slots=True)
class Spec:
    path: str
    name: str
    seed: int
    classes: list[TrafficClass]
    kv_blocks: int | None
    slos: dict[str, list[SLO]]
    pods: list[PodOption]
    pd_prefill: tuple[int, ...] = (0,)
    pd_routing: str = "pd"
    max_num_seqs: tuple[int | None, ...] = (None,)
    max_num_batched_tokens: tuple[int | None, ...] = (None,)
    routing: tuple[str, ...] = ("default",)
    admission: dict[str, tuple[float, ...]] = field(default_factory=dict)
    budget: int = 100
    method: str = "auto"
    raw: dict[str, Any] = field(default_factory=dict)

    def dimensions(self) -> list[tuple[str, tuple[Any, ...]]]:
        """The search space as (dimension, values), in a fixed order (candidates and trials use it)."""
        dims: list[tuple[str, tuple[Any, ...]]] = [(f"pods.{p.profile}", p.counts) for p in self.pods]
        dims.append(("pd_prefill", self.pd_prefill))
        dims.append(("max_num_seqs", self.max_num_seqs))
        dims.append(("max_num_batched_tokens", self.max_num_batched_tokens))
        dims.append(("routing", self.routing))
        dims += [(f"admission.{k}", v) for k, v in self.admission.items()]
        return dims

    def grid_size(self) -> int:
        n = 1
        for _, vals in self.dimensions():
            n *= len(vals)
        return n


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))

    def err(self, field_: str, reason: str) -> SpecError:
        return SpecError(self.path, field_, reason)

    def mapping(self, v: Any, field_: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.err(field_, f"must be a mapping, got {type(v).__name__}")
        unknown = [k for k in v if k not in allowed]
        if unknown:
            raise self.err(f"{field_}.{unknown[0]}" if field_ else str(unknown[0]), f"unknown key (allowed: {', '.join(allowed)})")
        for k in required:
            if k not in v:
                raise self.err(f"{field_}.{k}" if field_ else k, "is required")
        return v

    def integer(self, v: Any, field_: str, lo: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.err(field_, f"must be an integer, got {v!r}")
        if lo is not None and v < lo:
            raise self.err(field_, f"must be >= {lo}, got {v}")
        return v

    def number(self, v: Any, field_: str, lo: float | None = None, strict: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(field_, f"must be a finite number, got {v!r}")
        if lo is not None and (v <= lo if strict else v < lo):
            raise self.err(field_, f"must be {'>' if strict else '>='} {lo}, got {v}")
        return float(v)

    def values(self, v: Any, field_: str) -> list[Any]:
        """A list of choices (a scalar is a one-value list); never empty, no duplicates."""
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise self.err(field_, "must list at least one value")
        if len({json.dumps(x, sort_keys=True) for x in vals}) != len(vals):
            raise self.err(field_, f"has duplicate values: {vals}")
        return vals

    def resolve(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.base, p))


def _lengths(r: _Reader, v: Any, field_: str) -> Lengths:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        n = r.integer(v, field_, lo=1)
        return Lengths(float(n), 0.0, n, n)
    m = r.mapping(v, field_, ("mean", "sigma", "min", "max"), ("mean",))
    mean = r.number(m["mean"], f"{field_}.mean", lo=1)
    sigma = r.number(m.get("sigma", 0.0), f"{field_}.sigma", lo=0)
    lo = r.integer(m.get("min", 1), f"{field_}.min", lo=1)
    hi = r.integer(m.get("max", max(int(mean * 4), lo)), f"{field_}.max", lo=1)
    if hi < lo:
        raise r.err(f"{field_}.max", f"must be >= min ({lo}), got {hi}")
    if not lo <= mean <= hi:
        raise r.err(f"{field_}.mean", f"must lie within [min, max] = [{lo}, {hi}], got {mean}")
    return Lengths(mean, sigma, lo, hi)


def _stages(r: _Reader, v: Any, field_: str) -> str:
    from extproc.bench.workloads import parse_stages

    if not isinstance(v, str):
        raise r.err(field_, f"must be a string RATE:SECONDS,..., got {v!r}")
    try:
        parse_stages(v)
    except ValueError as e:
        raise r.err(field_, str(e)) from None
    return v


def _class(r: _Reader, v: Any, field_: str) -> TrafficClass:
    from extproc.bench.workloads import WORKLOADS

    m = r.mapping(v, field_, ("name", "priority", "workload", "stages", "lengths", "trace"), ("name", "priority"))
    name = m["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise r.err(f"{field_}.name", f"must be a word (letters, digits, _ . -), got {name!r}")
    tc = TrafficClass(name=name, priority=r.integer(m["priority"], f"{field_}.priority"))
    sources = [k for k in ("workload", "lengths", "trace") if k in m]
    if len(sources) != 1:
        raise r.err(field_, f"needs exactly one of workload, lengths, trace (got {', '.join(sources) or 'none'})")
    src = sources[0]
    if src == "trace":
        if "stages" in m:
            raise r.err(f"{field_}.stages", "a trace brings its own arrival times (drop 'stages')")
        p = m["trace"]
        if not isinstance(p, str) or not p:
            raise r.err(f"{field_}.trace", f"must be a file path, got {p!r}")
        tc.trace = r.resolve(p)
        if not os.path.isfile(tc.trace):
            raise r.err(f"{field_}.trace", f"no such file {tc.trace!r}")
        load_trace(tc.trace)  # a bad trace is a bad spec: fail now, with the line
        return tc
    if "stages" not in m:
        raise r.err(f"{field_}.stages", "is required (RATE:SECONDS,... Poisson stages)")
    tc.stages = _stages(r, m["stages"], f"{field_}.stages")
    if src == "workload":
        w = m["workload"]
        if w not in WORKLOADS:
            raise r.err(f"{field_}.workload", f"unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
        if w == "multi-lora":
            raise r.err(f"{field_}.workload", "multi-lora needs LoRA adapters on the fleet, which plan does not model")
        tc.workload = w
        return tc
    lm = r.mapping(m["lengths"], f"{field_}.lengths", ("input_tokens", "output_tokens", "prefix_groups", "prefix_tokens"),
                   ("input_tokens", "output_tokens"))
    tc.lengths_in = _lengths(r, lm["input_tokens"], f"{field_}.lengths.input_tokens")
    tc.lengths_out = _lengths(r, lm["output_tokens"], f"{field_}.lengths.output_tokens")
    tc.prefix_groups = r.integer(lm.get("prefix_groups", 0), f"{field_}.lengths.prefix_groups", lo=0)
    tc.prefix_tokens = r.integer(lm.get("prefix_tokens", 0), f"{field_}.lengths.prefix_tokens", lo=0)
    if (tc.prefix_groups > 0) != (tc.prefix_tokens > 0):
        raise r.err(f"{field_}.lengths", "prefix_groups and prefix_tokens go together (both > 0 or both absent)")
    return tc


TRACE_KEYS = ("arrival", "input_tokens", "output_tokens", "prefix_group", "prefix_tokens")


def load_trace(path: str) -> list[dict[str, Any]]:
    """A trace file: one JSON object per line (blank lines and ``#`` comments skipped) with ``arrival`` (seconds
    from the start, >= 0), ``input_tokens`` and ``output_tokens`` (>= 1), optionally ``prefix_group`` (an id:
    requests of one group share their first ``prefix_tokens`` tokens). Returned sorted by arrival."""
    rows: list[dict[str, Any]] = []
    r = _Reader(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise r.err("", f"cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        fld = f"line {n}"
        try:
            row = json.loads(s)
        except json.JSONDecodeError as e:
            raise r.err(fld, f"not JSON: {e.msg}") from None
        r.mapping(row, fld, TRACE_KEYS, ("arrival", "input_tokens", "output_tokens"))
        r.number(row["arrival"], f"{fld}.arrival", lo=0)
        r.integer(row["input_tokens"], f"{fld}.input_tokens", lo=1)
        r.integer(row["output_tokens"], f"{fld}.output_tokens", lo=1)
        if "prefix_group" in row:
            r.integer(row["prefix_group"], f"{fld}.prefix_group", lo=0)
            pt = r.integer(row.get("prefix_tokens", 0), f"{fld}.prefix_tokens", lo=1)
            if pt > row["input_tokens"]:
                raise r.err(f"{fld}.prefix_tokens", f"must be <= input_tokens ({row['input_tokens']}), got {pt}")
        elif "prefix_tokens" in row:
            raise r.err(f"{fld}.prefix_tokens", "needs prefix_group")
        rows.append(row)
    if not rows:
        raise r.err("", "the trace has no requests")
    rows.sort(key=lambda x: float(x["arrival"]))
    return rows


def _slos(r: _Reader, v: Any, classes: list[TrafficClass]) -> dict[str, list[SLO]]:
    names = [c.name for c in classes]
    m = r.mapping(v, "slos", tuple(names))
    out: dict[str, list[SLO]] = {}
    for cname, body in m.items():
        fld = f"slos.{cname}"
        if not isinstance(body, dict) or not body:
            raise r.err(fld, "must map SLO names (ttft_p90_ms, itl_p90_ms, e2e_p90_ms, success_rate, ...) to targets")
        slos: list[SLO] = []
        for k, t in body.items():
            if k == "success_rate":
                x = r.number(t, f"{fld}.{k}", lo=0)
                if x > 1:
                    raise r.err(f"{fld}.{k}", f"is a fraction within [0, 1], got {x}")
                slos.append(SLO("success_rate", 0.0, x))
                continue
            mt = SLO_RE.match(str(k))
            if not mt:
                raise r.err(f"{fld}.{k}", "unknown SLO (ttft_pNN_ms, itl_pNN_ms, e2e_pNN_ms with NN in 1..99, or success_rate)")
            q = float(mt.group(2))
            if not 0 < q < 100:
                raise r.err(f"{fld}.{k}", f"percentile must be within 1..99, got {q}")
            slos.append(SLO(mt.group(1), q, r.number(t, f"{fld}.{k}", lo=0, strict=True)))
        out[cname] = slos
    if not out:
        raise r.err("slos", "name at least one SLO")
    return out


def _search(r: _Reader, v: Any, spec: Spec) -> None:
    from extproc.sim.profiles import get_profile

    m = r.mapping(v, "search", ("pods", "pd_prefill", "pd_routing", "max_num_seqs", "max_num_batched_tokens", "routing", "admission"),
                  ("pods",))
    pods = m["pods"]
    if not isinstance(pods, dict) or not pods:
        raise r.err("search.pods", "must map accelerator profiles to {counts, cost_per_hour}")
    for prof, body in pods.items():
        fld = f"search.pods.{prof}"
        name = str(prof)
        if name.endswith((".yaml", ".yml")):
            name = r.resolve(name)
        try:
            get_profile(name)
        except (KeyError, ValueError, OSError, TypeError) as e:
            raise r.err(fld, str(e).strip('"')) from None
        b = r.mapping(body, fld, ("counts", "cost_per_hour"), ("counts", "cost_per_hour"))
        counts = tuple(r.integer(c, f"{fld}.counts", lo=0) for c in r.values(b["counts"], f"{fld}.counts"))
        spec.pods.append(PodOption(name, counts, r.number(b["cost_per_hour"], f"{fld}.cost_per_hour", lo=0)))
    if all(max(p.counts) == 0 for p in spec.pods):
        raise r.err("search.pods", "every count is 0: no candidate has a pod")
    max_pods = sum(max(p.counts) for p in spec.pods)
    if "pd_prefill" in m:
        spec.pd_prefill = tuple(r.integer(x, "search.pd_prefill", lo=0) for x in r.values(m["pd_prefill"], "search.pd_prefill"))
        if min(spec.pd_prefill) >= max_pods:
            raise r.err("search.pd_prefill", f"a P/D split needs fewer prefill pods than the largest fleet ({max_pods})")
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        if key in m:
            vals = tuple(r.integer(x, f"search.{key}", lo=1) for x in r.values(m[key], f"search.{key}"))
            setattr(spec, key, vals)
    routes: list[str] = []
    for i, x in enumerate(r.values(m.get("routing", ["default"]), "search.routing")):
        routes.append(_routing(r, x, f"search.routing[{i}]"))
    spec.routing = tuple(routes)
    if "pd_routing" in m or any(k > 0 for k in spec.pd_prefill):
        spec.pd_routing = _routing(r, m.get("pd_routing", "pd"), "search.pd_routing", pd=True)
    if "admission" in m:
        adm = r.mapping(m["admission"], "search.admission", ADMISSION_KEYS)
        for k, vals in adm.items():
            fld = f"search.admission.{k}"
            xs = r.values(vals, fld)
            if k in ("queueDepthThreshold", "maxInflightPerPod"):
                spec.admission[k] = tuple(float(r.integer(x, fld, lo=0)) for x in xs)
            else:
                spec.admission[k] = tuple(r.number(x, fld, lo=0) for x in xs)


def _routing(r: _Reader, x: Any, fld: str, pd: bool = False) -> str:
    """A built-in config name or a YAML path; the config must build (plugins known, parameters valid)."""
    from extproc.bench.setups import PD_TYPES
    from extproc.datalayer.endpoint import EndpointPool
    from extproc.scheduling.config import ConfigError, builtin_config_path, load_config

    if not isinstance(x, str) or not x:
        raise r.err(fld, f"must be a built-in config name or a YAML path, got {x!r}")
    path = r.resolve(x) if x.endswith((".yaml", ".yml")) else builtin_config_path(x)
    if not os.path.isfile(path):
        raise r.err(fld, f"no such config file {path!r}" if x.endswith((".yaml", ".yml")) else f"no built-in config named {x!r}")
    try:
        load_config(path, EndpointPool())
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except ConfigError as e:
        raise r.err(fld, f"config {path}: {e.reason}") from None
    except Exception as e:  # a plugin failing to build: the spec is unusable, say so here
        raise r.err(fld, f"config {path} failed to build: {type(e).__name__}: {e}") from None
    types = {p.get("type") for p in raw.get("plugins") or [] if isinstance(p, dict)}
    if pd and not types & set(PD_TYPES):
        raise r.err(fld, f"config {path} has no P/D profile handler ({', '.join(PD_TYPES)})")
    if not pd and types & set(PD_TYPES):
        raise r.err(fld, f"config {path} is a P/D config: list it as search.pd_routing with pd_prefill > 0")
    return path


def load_spec(path: str) -> Spec:
    """Read and validate a SPEC file. Raises :class:`SpecError`."""
    r = _Reader(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise r.err("", f"cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise r.err("", f"invalid YAML: {e}") from None
    return parse_spec(raw, path)


def parse_spec(raw: Any, path: str = "<spec>") -> Spec:
    r = _Reader(path)
    m = r.mapping(raw, "", ("name", "seed", "workload", "slos", "search", "budget", "method"), ("workload", "slos", "search"))
    wl = r.mapping(m["workload"], "workload", ("classes", "kv_blocks"), ("classes",))
    cls_raw = wl["classes"]
    if not isinstance(cls_raw, list) or not cls_raw:
        raise r.err("workload.classes", "must be a non-empty list of traffic classes")
    classes = [_class(r, c, f"workload.classes[{i}]") for i, c in enumerate(cls_raw)]
    seen: set[str] = set()
    for i, c in enumerate(classes):
        if c.name in seen:
            raise r.err(f"workload.classes[{i}].name", f"duplicate class name {c.name!r}")
        seen.add(c.name)
    kv = wl.get("kv_blocks")
    name = m.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str):
        raise r.err("name", f"must be a string, got {name!r}")
    spec = Spec(
        path=path,
        name=name,
        seed=r.integer(m.get("seed", 0), "seed", lo=0),
        classes=classes,
        kv_blocks=None if kv is None else r.integer(kv, "workload.kv_blocks", lo=1),
        slos=_slos(r, m["slos"], classes),
        pods=[],
        raw=raw,
    )
    _search(r, m["search"], spec)
    spec.budget = r.integer(m.get("budget", 100), "budget", lo=1)
    method = m.get("method", "auto")
    if method not in METHODS:
        raise r.err("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    spec.method = method
    if method == "grid" and spec.grid_size() > MAX_GRID:
        raise r.err("method", f"the grid has {spec.grid_size()} points (over {MAX_GRID}): use optuna or random")
    return spec
