"""A physics-based step-time model for the simulated vLLM engine (roofline terms + a few learned coefficients).

Per engine step, from the model's dimensions (``Architecture``), the accelerator's datasheet figures (``GPU``)
and the tensor-parallel degree, the model computes basis terms in seconds::

    weights   bytes of weights read once per step / HBM bandwidth      (MoE: dense part + experts the batch touches)
    kv        bytes of KV cache read and written by attention / HBM bandwidth
    compute   FLOPs of the step (linear layers, attention scores, lm_head for sampled positions) / peak FLOP/s
    tp_bytes  all-reduce bytes (2 per layer, ring: 2(tp-1)/tp x tokens x hidden x dtype) / link bandwidth
    tp_hop    2 x layers x (tp - 1) all-reduce hops x the GPU table's per-hop link latency
    step, seq, layer, moe_layer   1, scheduled sequences, layers, MoE layers (microseconds each are learned)

and the step time is ``sum(coefficient_k x term_k)`` (``RooflineCoefficients``): dimensionless corrections for
the roofline terms (how far real kernels run below the bound) and per-step/per-sequence/per-layer overheads in
microseconds, all global (not per model or GPU), so a fit on some models predicts others from their dimensions.
``ingress_ms``/``egress_ms`` are per-request overheads outside the engine (API server: HTTP, tokenization,
detokenization, streaming), applied by the validation driver (``extproc.sim.fidelity``).

Tables: ``extproc/sim/data/architectures.yaml`` and ``gpus.yaml`` (public config.json facts and datasheet figures,
sources inside); ``load_architectures(path)``/``load_gpus(path)`` add user YAML. A ``Profile`` with a
``roofline`` mapping (``{model, gpu, tp, coefficients}``) makes the engine use this model instead of its
linear b0/b1/b2 formula; ``roofline_profile()`` builds one, with the KV-cache size derived from GPU memory.
docs/simulator.md has the design, docs/calibration.md the fit and the held-out validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

__all__ = [
    "Architecture",
    "GPU",
    "RooflineCoefficients",
    "RooflineStepModel",
    "TERMS",
    "architectures",
    "gpus",
    "get_architecture",
    "get_gpu",
    "load_architectures",
    "load_gpus",
    "default_coefficients",
    "kv_blocks_for",
    "kv_cache_groups",
    "roofline_profile",
    "step_model_from_profile",
]

GIB = 1024**3
# Basis terms, in the order of RooflineCoefficients' step-time fields.
TERMS: tuple[str, ...] = ("weights", "kv", "compute", "tp_bytes", "tp_hop", "step_us", "seq_us", "layer_us", "moe_layer_us")


@dataclass(frozen=True, slots=True)
class Architecture:
    """Public dimensions of a decoder-only transformer (HuggingFace config.json)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0 = hidden // heads
    tied: bool = False
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0
    moe_layers: int = -1  # -1 = every layer when experts > 0
    dtype_bytes: float = 2.0
    expert_dtype_bytes: float = 0.0  # 0 = dtype_bytes
    sliding_window: int = 0
    sliding_layers: int = 0  # layers using the sliding window; the rest are full attention
    # the repeating unit of layer kinds ("sliding" / "full"), layer i has kind pattern[i % len]; when given it
    # must agree with sliding_layers (documents which layers slide; the KV-cache groups only need the counts)
    attention_pattern: tuple[str, ...] = ()
    qkv_bias: bool = False
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "vocab"):
            if getattr(self, f) <= 0:
                raise ValueError(f"architecture {self.name}: {f} must be > 0")
        if self.intermediate < 0 or self.experts < 0:
            raise ValueError(f"architecture {self.name}: intermediate/experts must be >= 0")
        if self.experts and not (0 < self.experts_per_token <= self.experts and self.moe_intermediate > 0):
            raise ValueError(f"architecture {self.name}: MoE needs 0 < experts_per_token <= experts and moe_intermediate")
        if not self.experts and self.intermediate <= 0:
            raise ValueError(f"architecture {self.name}: a dense model needs intermediate > 0")
        if not 0 <= self.sliding_layers <= self.layers:
            raise ValueError(f"architecture {self.name}: sliding_layers must be within [0, layers]")
        if self.sliding_layers and self.sliding_window <= 0:
            raise ValueError(f"architecture {self.name}: sliding_layers needs sliding_window > 0")
        if self.attention_pattern:
            if set(self.attention_pattern) - {"sliding", "full"}:
                raise ValueError(f"architecture {self.name}: attention_pattern holds 'sliding' / 'full' only")
            n = sum(1 for k in self.layer_kinds() if k == "sliding")
            if n != self.sliding_layers:
                raise ValueError(
                    f"architecture {self.name}: attention_pattern gives {n} sliding layers, sliding_layers says "
                    f"{self.sliding_layers}"
                )

    def layer_kinds(self) -> list[str]:
        """Per layer, "sliding" or "full" (from ``attention_pattern``; else the sliding layers come first)."""
        pat = self.attention_pattern
        if pat:
            return [pat[i % len(pat)] for i in range(self.layers)]
        return ["sliding"] * self.sliding_layers + ["full"] * (self.layers - self.sliding_layers)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def n_moe_layers(self) -> int:
        if not self.experts:
            return 0
        return self.layers if self.moe_layers < 0 else self.moe_layers

    @property
    def attn_params(self) -> int:
        """Per layer: q, k, v, o projections (+ qkv bias)."""
        q = self.heads * self.hd
        kv = self.kv_heads * self.hd
        p = self.hidden * (q + 2 * kv) + q * self.hidden
        return p + ((q + 2 * kv) if self.qkv_bias else 0)

    @property
    def expert_params(self) -> int:
        """One routed expert of one layer (gated MLP: 3 matrices)."""
        return 3 * self.hidden * self.moe_intermediate

    def dense_mlp_params(self, layer_is_moe: bool) -> int:
        if layer_is_moe:
            return 3 * self.hidden * self.shared_expert_intermediate + self.hidden * self.experts  # + router
        return 3 * self.hidden * self.intermediate

    @property
    def lm_head_params(self) -> int:
        return self.hidden * self.vocab

    @property
    def total_params(self) -> int:
        m = self.n_moe_layers
        d = self.layers - m
        body = self.layers * self.attn_params + d * self.dense_mlp_params(False)
        body += m * (self.dense_mlp_params(True) + self.experts * self.expert_params)
        emb = self.hidden * self.vocab
        return body + emb + (0 if self.tied else self.lm_head_params)

    def weight_bytes(self) -> float:
        """Bytes of all weights (embeddings included) as loaded."""
        m = self.n_moe_layers
        ebytes = self.expert_dtype_bytes or self.dtype_bytes
        experts = m * self.experts * self.expert_params
        return (self.total_params - experts) * self.dtype_bytes + experts * ebytes

    def kv_bytes_per_token(self) -> float:
        """K and V of one token over all layers (full and sliding), before tensor-parallel sharding."""
        return 2.0 * self.layers * self.kv_heads * self.hd * self.dtype_bytes

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Architecture:
        d = dict(data)
        d.setdefault("name", name)
        if "aliases" in d:
            d["aliases"] = tuple(d["aliases"] or ())
        if "attention_pattern" in d:
            d["attention_pattern"] = tuple(d["attention_pattern"] or ())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"architecture {name}: unknown fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True, slots=True)
class GPU:
    """Datasheet figures of one accelerator."""

    name: str
    bf16_tflops: float
    hbm_tbps: float
    memory_gib: float
    link_gbps: float = 0.0  # per direction, to tensor-parallel peers
    link_latency_us: float = 10.0
    fp8_tflops: float = 0.0
    source: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in ("bf16_tflops", "hbm_tbps", "memory_gib"):
            if getattr(self, f) <= 0:
                raise ValueError(f"gpu {self.name}: {f} must be > 0")

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> GPU:
        d = dict(data)
        d.setdefault("name", name)
        if "aliases" in d:
            d["aliases"] = tuple(d["aliases"] or ())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"gpu {name}: unknown fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True, slots=True)
class RooflineCoefficients:
    """Global learned coefficients (see module docstring). Defaults: a physics prior, not a fit."""

    weights: float = 1.25  # 1 / (80 % of peak HBM bandwidth)
    kv: float = 1.25
    compute: float = 2.0  # 1 / (50 % MFU)
    tp_bytes: float = 1.0
    tp_hop: float = 1.0
    step_us: float = 1000.0
    seq_us: float = 0.0
    layer_us: float = 0.0
    moe_layer_us: float = 0.0
    ingress_ms: float = 10.0
    egress_ms: float = 0.0
    source: str = "physics prior (80 % HBM bandwidth, 50 % MFU); not fitted"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "source" and getattr(self, f.name) < 0:
                raise ValueError(f"roofline coefficient {f.name} must be >= 0")

    def step_vector(self) -> tuple[float, ...]:
        """Multipliers for the basis terms, in ``TERMS`` order (microsecond terms come as counts x 1e-6 s)."""
        return tuple(float(getattr(self, t)) for t in TERMS)

    def replace(self, **changes: Any) -> RooflineCoefficients:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RooflineCoefficients:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown roofline coefficients: {sorted(unknown)}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | Path) -> RooflineCoefficients:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if isinstance(data, dict) and "coefficients" in data:
            data = data["coefficients"]
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of roofline coefficients")
        return cls.from_dict(data)


# ---- tables ---------------------------------------------------------------------------------------------------

_ARCHS: dict[str, Architecture] = {}
_ARCH_ALIASES: dict[str, str] = {}
_GPUS: dict[str, GPU] = {}
_GPU_ALIASES: dict[str, str] = {}


def _read_yaml(path: str | Path | None, package_file: str) -> dict[str, Any]:
    if path is None:
        text = resources.files("extproc.sim").joinpath("data", package_file).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path or package_file}: expected a mapping of name -> fields")
    return data


def load_architectures(path: str | Path | None = None) -> list[Architecture]:
    """Add the architectures of a YAML file (default: the shipped table) to the registry; returns them."""
    out = [Architecture.from_dict(str(k), v) for k, v in _read_yaml(path, "architectures.yaml").items()]
    for a in out:
        _ARCHS[a.name] = a
        for al in (a.name, *a.aliases):
            _ARCH_ALIASES[al.lower()] = a.name
    return out


def load_gpus(path: str | Path | None = None) -> list[GPU]:
    out = [GPU.from_dict(str(k), v) for k, v in _read_yaml(path, "gpus.yaml").items()]
    for g in out:
        _GPUS[g.name] = g
        for al in (g.name, *g.aliases):
            _GPU_ALIASES[al.lower()] = g.name
    return out


def architectures() -> dict[str, Architecture]:
    if not _ARCHS:
        load_architectures()
    return dict(_ARCHS)


def gpus() -> dict[str, GPU]:
    if not _GPUS:
        load_gpus()
    return dict(_GPUS)


def get_architecture(spec: str | Mapping[str, Any] | Architecture) -> Architecture:
    """By name or alias (case-insensitive), or inline dimensions (a mapping with at least layers/hidden/...)."""
    if isinstance(spec, Architecture):
        return spec
    if isinstance(spec, Mapping):
        return Architecture.from_dict(str(spec.get("name", "custom")), spec)
    if not _ARCHS:
        load_architectures()
    key = _ARCH_ALIASES.get(spec.lower())
    if key is None:
        raise KeyError(f"unknown model architecture {spec!r}; known: {', '.join(sorted(_ARCHS))} (or give dimensions)")
    return _ARCHS[key]


def get_gpu(spec: str | Mapping[str, Any] | GPU) -> GPU:
    if isinstance(spec, GPU):
        return spec
    if isinstance(spec, Mapping):
        return GPU.from_dict(str(spec.get("name", "custom")), spec)
    if not _GPUS:
        load_gpus()
    key = _GPU_ALIASES.get(spec.lower())
    if key is None:
        raise KeyError(f"unknown GPU {spec!r}; known: {', '.join(sorted(_GPUS))} (or give its figures)")
    return _GPUS[key]


def default_coefficients() -> RooflineCoefficients:
    """The shipped fit (extproc/sim/data/roofline-coefficients.yaml), or the physics prior if absent."""
    try:
        text = resources.files("extproc.sim").joinpath("data", "roofline-coefficients.yaml").read_text(encoding="utf-8")
    except FileNotFoundError:
        return RooflineCoefficients()
    data = yaml.safe_load(text)
    return RooflineCoefficients.from_dict(data["coefficients"] if "coefficients" in data else data)


# ---- the step model -------------------------------------------------------------------------------------------


class _Scheduled(Protocol):
    num_computed: int


class RooflineStepModel:
    """Step time of one engine step from what it schedules: ``(seq, n)`` pairs, ``seq.num_computed`` = context
    already in the KV cache, ``n`` = new tokens computed this step (1 when decoding)."""

    __slots__ = (
        "arch",
        "gpu",
        "tp",
        "coeffs",
        "record",
        "_c",
        "_w_dense",
        "_w_expert",
        "_moe_layers",
        "_experts",
        "_k_over_e",
        "_kv_full",
        "_kv_slide",
        "_window",
        "_flops_tok",
        "_flops_seq",
        "_attn_full",
        "_attn_slide",
        "_tp_bytes_tok",
        "_hops",
        "_layers",
        "_inv_bw",
        "_inv_flops",
    )

    def __init__(self, arch: Architecture, gpu: GPU, tp: int = 1, coeffs: RooflineCoefficients | None = None) -> None:
        if tp < 1:
            raise ValueError("tp must be >= 1")
        self.arch = arch
        self.gpu = gpu
        self.tp = tp
        self.coeffs = coeffs or RooflineCoefficients()
        self.record: list[tuple[float, ...]] | None = None  # when a list, every step appends its basis terms
        self._c = self.coeffs.step_vector()
        a = arch
        m = a.n_moe_layers
        dense_layers = a.layers - m
        db = a.dtype_bytes
        eb = a.expert_dtype_bytes or db
        # weights read per step on one GPU (embedding rows are gathered, not streamed; lm_head is read)
        dense_params = a.layers * a.attn_params + dense_layers * a.dense_mlp_params(False)
        dense_params += m * a.dense_mlp_params(True) + a.lm_head_params
        self._w_dense = dense_params * db / tp
        self._w_expert = a.expert_params * eb / tp  # one expert of one layer
        self._moe_layers = m
        self._experts = a.experts
        self._k_over_e = (a.experts_per_token / a.experts) if a.experts else 0.0
        kv_heads_gpu = max(a.kv_heads / tp, 1.0)  # KV heads are replicated when tp > kv_heads
        per_layer_kv = 2.0 * kv_heads_gpu * a.hd * db
        self._kv_full = per_layer_kv * (a.layers - a.sliding_layers)
        self._kv_slide = per_layer_kv * a.sliding_layers
        self._window = a.sliding_window
        # FLOPs on one GPU: 2 per weight per token for linear layers (active experts only), lm_head once per
        # sampled position, attention 4 x heads x head_dim per (query, key) pair per layer
        active_mlp = dense_layers * a.dense_mlp_params(False) + m * (
            a.dense_mlp_params(True) + a.experts_per_token * a.expert_params
        )
        self._flops_tok = 2.0 * (a.layers * a.attn_params + active_mlp) / tp
        self._flops_seq = 2.0 * a.lm_head_params / tp
        heads_gpu = a.heads / tp
        self._attn_full = 4.0 * heads_gpu * a.hd * (a.layers - a.sliding_layers)
        self._attn_slide = 4.0 * heads_gpu * a.hd * a.sliding_layers
        # tensor-parallel all-reduce: 2 per layer (attention output, MLP output), ring algorithm
        if tp > 1 and gpu.link_gbps > 0:
            self._tp_bytes_tok = 2 * a.layers * 2.0 * (tp - 1) / tp * a.hidden * db / (gpu.link_gbps * 1e9)
        else:
            self._tp_bytes_tok = 0.0
        self._hops = 2.0 * a.layers * (tp - 1) * gpu.link_latency_us * 1e-6
        self._layers = float(a.layers)
        self._inv_bw = 1.0 / (gpu.hbm_tbps * 1e12)
        self._inv_flops = 1.0 / (gpu.bf16_tflops * 1e12)

    def terms(self, scheduled: Sequence[tuple[_Scheduled, int]]) -> tuple[float, ...]:
        """Basis terms of one step (seconds, in ``TERMS`` order; microsecond terms as count x 1e-6)."""
        tokens = 0
        kv_tok = 0.0
        pairs = 0.0
        kv_slide_tok = 0.0
        pairs_slide = 0.0
        w = self._window
        for seq, n in scheduled:
            ctx = seq.num_computed
            tokens += n
            end = ctx + n
            kv_tok += end
            pairs += n * (ctx + (n + 1) * 0.5)
            if w:
                kv_slide_tok += end if end < w else w + n
                mid = ctx + (n + 1) * 0.5
                pairs_slide += n * (mid if mid < w else w)
        nseq = len(scheduled)
        if self._experts and tokens:
            touched = self._experts * (1.0 - (1.0 - self._k_over_e) ** tokens)
        else:
            touched = 0.0
        weights = (self._w_dense + touched * self._w_expert * self._moe_layers) * self._inv_bw
        kv = (kv_tok * self._kv_full + kv_slide_tok * self._kv_slide) * self._inv_bw
        compute = (
            tokens * self._flops_tok + nseq * self._flops_seq + pairs * self._attn_full + pairs_slide * self._attn_slide
        ) * self._inv_flops
        return (
            weights,
            kv,
            compute,
            tokens * self._tp_bytes_tok,
            self._hops,
            1e-6,
            nseq * 1e-6,
            self._layers * 1e-6,
            self._moe_layers * 1e-6,
        )

    def __call__(self, scheduled: Sequence[tuple[_Scheduled, int]]) -> float:
        """Step time in seconds."""
        t = self.terms(scheduled)
        rec = self.record
        if rec is not None:
            rec.append(t)
        c = self._c
        return (
            c[0] * t[0] + c[1] * t[1] + c[2] * t[2] + c[3] * t[3] + c[4] * t[4] + c[5] * t[5] + c[6] * t[6]
            + c[7] * t[7] + c[8] * t[8]
        )


def kv_cache_groups(arch: Architecture, *, hybrid: bool = True) -> list[dict[str, Any]]:
    """The KV-cache groups vLLM's hybrid allocator forms for ``arch`` (kv_cache_utils.py,
    ``_get_kv_cache_groups_uniform_page_size``): layers are bucketed by kind; the group size is the smallest
    bucket (the largest when the largest is < 1.5x the smallest); each bucket is split into ceil(n / size) groups
    (the last one padded). Full-attention groups come first here. Each group is ``{kind, sliding_window, layers}``.
    ``hybrid=False`` is ``--disable-hybrid-kv-cache-manager``: every layer is allocated as full attention."""
    sliding = arch.sliding_layers if hybrid else 0
    full = arch.layers - sliding
    buckets = [(k, n) for k, n in (("full_attention", full), ("sliding_window", sliding)) if n > 0]
    lo = min(n for _, n in buckets)
    hi = max(n for _, n in buckets)
    size = hi if hi < 1.5 * lo else lo
    out: list[dict[str, Any]] = []
    for kind, n in buckets:
        for gi in range(-(-n // size)):
            layers = min(size, n - gi * size)
            out.append({"kind": kind, "sliding_window": arch.sliding_window if kind == "sliding_window" else None,
                        "layers": layers})
    return out


def kv_group_size(groups: Sequence[Mapping[str, Any]]) -> int:
    """Layers per KV-cache group (padded): one block of the shared pool holds this many layers' KV."""
    return max(int(g.get("layers", 0) or 0) for g in groups)


def kv_blocks_for(
    arch: Architecture,
    gpu: GPU,
    tp: int,
    block_size: int = 16,
    gpu_memory_utilization: float = 0.9,
    reserve_gib: float | None = None,
    *,
    hybrid: bool = False,
) -> int:
    """KV-cache blocks vLLM would allocate: per GPU, ``utilization x memory - weights/tp - reserve`` over the KV
    bytes of one block. ``reserve_gib`` (activations of the profiling run, CUDA graphs, NCCL buffers) defaults to
    1.5 GiB + 0.5 GiB when tp > 1, an estimate (vLLM logs the real figure as "GPU KV cache size").

    ``hybrid=False``: one block holds every layer's KV (one KV-cache group; a model's sliding layers are then
    allocated like full ones). ``hybrid=True``: vLLM's hybrid allocator, one block holds one group's layers
    (``kv_cache_groups``), so the pool has more, smaller blocks and each group takes its own blocks per request."""
    if reserve_gib is None:
        reserve_gib = 1.5 + (0.5 if tp > 1 else 0.0)
    free = gpu_memory_utilization * gpu.memory_gib * GIB - arch.weight_bytes() / tp - reserve_gib * GIB
    kv_heads_gpu = max(arch.kv_heads / tp, 1.0)
    layers_per_block = kv_group_size(kv_cache_groups(arch)) if hybrid else arch.layers
    per_block = 2.0 * kv_heads_gpu * arch.hd * arch.dtype_bytes * layers_per_block * block_size
    blocks = int(free // per_block)
    if blocks <= 0:
        raise ValueError(f"{arch.name} does not fit on {tp} x {gpu.name} with utilization {gpu_memory_utilization}")
    return blocks


def roofline_profile(
    model: str | Mapping[str, Any] | Architecture,
    gpu: str | Mapping[str, Any] | GPU,
    tp: int = 1,
    *,
    coefficients: RooflineCoefficients | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    block_size: int = 16,
    num_gpu_blocks: int | None = None,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int = 8192,
    name: str | None = None,
    hybrid_kv_cache: bool = True,
) -> Any:
    """A ``Profile`` whose engine uses the roofline step model (b0/b1/b2 are left at 0; a0 stays per admission).
    ``hybrid_kv_cache``: a model with sliding-window layers gets vLLM's hybrid KV-cache groups
    (``kv_cache_groups``; blocks sized per group) instead of one full-attention group."""
    from extproc.sim.profiles import Profile

    a = get_architecture(model)
    g = get_gpu(gpu)
    c = coefficients or default_coefficients()
    hybrid = hybrid_kv_cache and a.sliding_layers > 0
    blocks = num_gpu_blocks or kv_blocks_for(a, g, tp, block_size, gpu_memory_utilization, hybrid=hybrid)
    return Profile(
        name=name or f"{a.name.lower()}-{g.name.split('-')[0].lower()}-tp{tp}-roofline",
        model=a.name,
        accelerator=f"{tp}x{g.name}" if tp > 1 else g.name,
        b0_ms=0.0,
        b1_ms=0.0,
        b2_ms=0.0,
        a0_ms=0.0,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        num_gpu_blocks=blocks,
        block_size=block_size,
        max_model_len=max_model_len,
        sources=f"roofline step model: {a.name} on {tp} x {g.name} ({g.source}); coefficients: {c.source}",
        roofline={
            "model": dataclasses.asdict(a) | {"aliases": list(a.aliases), "attention_pattern": list(a.attention_pattern)},
            "gpu": dataclasses.asdict(g) | {"aliases": list(g.aliases)},
            "tp": tp,
            "coefficients": c.to_dict(),
        },
        kv_cache_groups=kv_cache_groups(a) if hybrid else None,
    )


def step_model_from_profile(roofline: Mapping[str, Any]) -> RooflineStepModel:
    """The step model a profile's ``roofline`` mapping describes (``model``, ``gpu``: names or inline fields)."""
    unknown = set(roofline) - {"model", "gpu", "tp", "coefficients"}
    if unknown:
        raise ValueError(f"unknown roofline fields: {sorted(unknown)}")
    if "model" not in roofline or "gpu" not in roofline:
        raise ValueError("a roofline profile needs model and gpu")
    coeffs = roofline.get("coefficients")
    c = RooflineCoefficients.from_dict(coeffs) if coeffs else default_coefficients()
    tp = int(roofline.get("tp", 1))
    return RooflineStepModel(get_architecture(roofline["model"]), get_gpu(roofline["gpu"]), tp, c)


def expected_touched_experts(experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts of one MoE layer that ``tokens`` tokens route to (uniform top-k routing)."""
    if experts <= 0 or tokens <= 0:
        return 0.0
    return experts * (1.0 - (1.0 - k / experts) ** tokens)
