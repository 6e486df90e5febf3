"""The roofline step model: architecture/GPU tables, basis terms, engine integration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from extproc.sim.engine import Engine, SimRequest
from extproc.sim.profiles import PROFILES, Profile
from extproc.sim.roofline import (
    RooflineCoefficients,
    RooflineStepModel,
    architectures,
    expected_touched_experts,
    get_architecture,
    get_gpu,
    gpus,
    kv_blocks_for,
    load_architectures,
    roofline_profile,
)


class _S:
    __slots__ = ("num_computed",)

    def __init__(self, c: int) -> None:
        self.num_computed = c


@pytest.mark.parametrize(
    ("name", "params_b"),
    [("Llama-2-7b", 6.74), ("Llama-2-70b", 68.98), ("CodeLlama-34b", 33.74), ("Mixtral-8x7B", 46.70),
     ("Llama-3-8B", 8.03), ("Qwen2.5-7B", 7.62), ("Yi-34B", 34.39), ("Qwen3-30B-A3B", 30.5)],
)
def test_parameter_counts_match_published_sizes(name: str, params_b: float) -> None:
    assert get_architecture(name).total_params / 1e9 == pytest.approx(params_b, rel=0.01)


def test_aliases_and_kv_bytes() -> None:
    a = get_architecture("meta-llama/Llama-2-7b-hf")
    assert a.name == "Llama-2-7b"
    assert a.kv_bytes_per_token() == 2 * 32 * 32 * 128 * 2  # 512 KiB, multi-head attention
    assert get_architecture("mistralai/Mixtral-8x7B-v0.1").kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    with pytest.raises(KeyError):
        get_architecture("no-such-model")


def test_tables_cover_the_families_and_gpus() -> None:
    names = set(architectures())
    for fam in ("Llama-2-7b", "Llama-3-70B", "Mixtral-8x7B", "Qwen2.5-72B", "Qwen3-32B", "CodeLlama-34b", "Yi-34B",
                "gpt-oss-120b", "Mistral-7B-v0.3"):
        assert fam in names
    g = gpus()
    for name in ("H100-SXM-80GB", "A100-SXM-80GB", "L40S-48GB", "MI300X-192GB", "Gaudi3-128GB"):
        assert g[name].source and g[name].bf16_tflops > 0 and g[name].hbm_tbps > 0
    assert get_gpu("h100").hbm_tbps == 3.35 and get_gpu("MI300X").hbm_tbps == 5.3


def test_user_architecture_yaml(tmp_path: Path) -> None:
    p = tmp_path / "a.yaml"
    p.write_text("Tiny-1:\n  aliases: [me/tiny]\n  layers: 2\n  hidden: 256\n  heads: 4\n  kv_heads: 2\n"
                 "  intermediate: 512\n  vocab: 1000\n")
    load_architectures(p)
    assert get_architecture("me/tiny").layers == 2
    inline = get_architecture({"layers": 2, "hidden": 64, "heads": 2, "kv_heads": 2, "intermediate": 128, "vocab": 10})
    assert inline.hd == 32
    with pytest.raises(ValueError):
        get_architecture({"layers": 2, "hidden": 64, "heads": 2, "kv_heads": 2, "intermediate": 128, "vocab": 10,
                          "bogus": 1})


def test_decode_step_terms_follow_the_roofline() -> None:
    a, g = get_architecture("Llama-2-7b"), get_gpu("H100")
    sm = RooflineStepModel(a, g, 1, RooflineCoefficients(weights=1, kv=1, compute=1, step_us=0, ingress_ms=0))
    t1 = sm.terms([(_S(1000), 1)])
    # weights: every non-embedding weight read once: (params - embeddings) x 2 bytes / 3.35 TB/s
    w_bytes = (a.total_params - a.hidden * a.vocab) * 2
    assert t1[0] == pytest.approx(w_bytes / 3.35e12, rel=1e-9)
    # kv: 1001 tokens of context x 512 KiB
    assert t1[1] == pytest.approx(1001 * a.kv_bytes_per_token() / 3.35e12, rel=1e-9)
    t8 = sm.terms([(_S(1000), 1)] * 8)
    assert t8[0] == t1[0] and t8[1] == pytest.approx(8 * t1[1]) and t8[2] > t1[2]
    assert sm([(_S(1000), 1)] * 8) > sm([(_S(1000), 1)])
    # a prefill chunk is compute-heavy: 2048 tokens of 7B at 989 TFLOPS ~ 28 ms of FLOPs
    tp = sm.terms([(_S(0), 2048)])
    assert 0.02 < tp[2] < 0.04


def test_tensor_parallel_splits_weights_and_adds_comms() -> None:
    a, g = get_architecture("Llama-2-70b"), get_gpu("H100")
    t1 = RooflineStepModel(a, g, 1).terms([(_S(500), 1)])
    t4 = RooflineStepModel(a, g, 4).terms([(_S(500), 1)])
    assert t4[0] == pytest.approx(t1[0] / 4)
    assert t1[3] == 0 and t1[4] == 0
    assert t4[4] == pytest.approx(2 * 80 * 3 * g.link_latency_us * 1e-6)


def test_moe_reads_only_touched_experts() -> None:
    assert expected_touched_experts(8, 2, 1) == pytest.approx(2.0)
    assert expected_touched_experts(8, 2, 200) == pytest.approx(8.0, rel=1e-6)
    a, g = get_architecture("Mixtral-8x7B"), get_gpu("H100")
    sm = RooflineStepModel(a, g, 2)
    one = sm.terms([(_S(100), 1)])[0]
    many = sm.terms([(_S(100), 1)] * 64)[0]
    assert one < many
    dense = (a.total_params - a.hidden * a.vocab - 32 * 8 * a.expert_params) * 2 / 2 / 3.35e12
    assert one == pytest.approx(dense + 32 * 2 * a.expert_params * 2 / 2 / 3.35e12, rel=1e-9)


def test_sliding_window_layers_read_at_most_the_window() -> None:
    a, g = get_architecture("gpt-oss-20b"), get_gpu("H100")
    sm = RooflineStepModel(a, g, 1)
    short = sm.terms([(_S(100), 1)])[1]
    long = sm.terms([(_S(100_000), 1)])[1]
    per_tok_12_layers = 2 * 8 * 64 * 2 * 12 / 3.35e12
    # the 12 full-attention layers read the whole context, the 12 sliding ones at most window + new tokens
    assert long - short == pytest.approx((100_000 - 100) * per_tok_12_layers + (129 - 101) * per_tok_12_layers,
                                         rel=1e-9)


def test_kv_blocks_from_memory() -> None:
    a, g = get_architecture("Llama-2-7b"), get_gpu("H100")
    blocks = kv_blocks_for(a, g, 1)
    free = 0.9 * 79.6 * 2**30 - a.weight_bytes() - 1.5 * 2**30
    assert blocks == int(free // (16 * a.kv_bytes_per_token()))
    assert kv_blocks_for(get_architecture("Llama-2-70b"), g, 4) > 20_000
    with pytest.raises(ValueError):
        kv_blocks_for(get_architecture("Llama-2-70b"), get_gpu("L40S"), 1)


def test_engine_uses_the_step_model_and_named_profiles_do_not() -> None:
    for p in PROFILES.values():
        if p.name.endswith("-roofline"):  # the named roofline profiles (the pd workload's fleet) carry the model
            assert p.roofline is not None and Engine(p).step_model is not None
            continue
        assert p.roofline is None and "roofline" not in p.to_dict()
        assert Engine(p).step_model is None
    prof = roofline_profile("Llama-3-8B", "H100", 1, coefficients=RooflineCoefficients(), max_num_seqs=8,
                            num_gpu_blocks=512)
    eng = Engine(prof, record_kv_events=False)
    assert eng.step_model is not None
    eng.add_request(SimRequest("a", list(range(1, 300)), 4))
    res = eng.step(0.0)
    c = RooflineCoefficients()
    expected = eng.step_model.terms([(_S(0), 299)])
    assert res.duration_s == pytest.approx(sum(x * y for x, y in zip(c.step_vector(), expected, strict=True)))
    now = res.duration_s
    while eng.has_work():
        now += eng.step(now).duration_s
    assert math.isfinite(now) and eng.stats.generation_tokens_total == 4


def test_roofline_profile_yaml_round_trip(tmp_path: Path) -> None:
    prof = roofline_profile("Qwen3-8B", "A100", 2, max_num_seqs=64)
    p = tmp_path / "p.yaml"
    prof.to_yaml(p)
    back = Profile.from_yaml(p)
    assert back.roofline == prof.roofline and back.num_gpu_blocks == prof.num_gpu_blocks
    assert Engine(back).step_model is not None
