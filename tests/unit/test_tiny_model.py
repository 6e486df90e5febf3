"""The tiny local model directory: complete, deterministic, and a tokenizer that round-trips text."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from extproc.sim import tiny_model
from extproc.sim.tiny_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END,
    IM_START,
    MODEL_FILES,
    build_tiny_model,
    corpus,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_writes_every_file(model_dir: Path) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(MODEL_FILES)


def test_config_is_the_tiny_llama(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (128, 256, 2)
    assert cfg["num_attention_heads"] * cfg["head_dim"] == cfg["hidden_size"]
    assert cfg["head_dim"] == 32  # vLLM CPU attention supports 32, not 16
    assert cfg["max_position_embeddings"] == 2048
    assert cfg["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert 2000 <= cfg["vocab_size"] <= 4096
    assert cfg["bos_token_id"] == tok.token_to_id(BOS_TOKEN)
    assert cfg["eos_token_id"] == tok.token_to_id(EOS_TOKEN)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"]


def test_tokenizer_round_trips_and_prepends_bos(model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "Route the request to pod-7 (latency 12 ms); ünïcödé & emoji 🚀 survive byte-level BPE."
    enc = tok.encode(text)
    assert enc.ids[0] == tok.token_to_id(BOS_TOKEN)
    assert tok.decode(enc.ids) == text
    # BPE actually merged: common words are single tokens, so far fewer tokens than bytes
    plain = "the server should route the request to the pod with the good prefix cache"
    assert len(tok.encode(plain, add_special_tokens=False).ids) == len(plain.split())
    # chat markup tokens are atomic
    chat = tok.encode(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)
    assert chat.ids[0] == tok.token_to_id(IM_START)
    assert chat.ids[-1] == tok.token_to_id(IM_END)


def test_tokenizer_config_has_chat_template_and_specials(model_dir: Path) -> None:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == BOS_TOKEN and cfg["eos_token"] == EOS_TOKEN
    assert IM_START in cfg["chat_template"] and "add_generation_prompt" in cfg["chat_template"]
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_build_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "again")
    for name in MODEL_FILES:
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_corpus_is_deterministic_and_seed_dependent() -> None:
    a = list(corpus(seed=1, sentences=50))
    assert a == list(corpus(seed=1, sentences=50))
    assert a != list(corpus(seed=2, sentences=50))


def test_rebuild_skips_complete_dir_unless_forced(tmp_path: Path) -> None:
    d = build_tiny_model(tmp_path / "m")
    marker = d / "config.json"
    marker.write_text("{}")
    build_tiny_model(d)
    assert marker.read_text() == "{}"  # complete dir left alone
    build_tiny_model(d, force=True)
    assert json.loads(marker.read_text())["model_type"] == "llama"


def test_cli_writes_directory(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "extproc.sim.tiny_model", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert proc.stdout.strip() == str(out.resolve())
    assert tiny_model.is_complete(out)


def _vllm_python() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    py = root / ".venv-vllm" / "bin" / "python"
    return py if py.exists() and (root / ".venv-vllm" / ".real_vllm_setup.stamp").exists() else None


@pytest.mark.skipif(_vllm_python() is None, reason="transformers lives in .venv-vllm (scripts/real_vllm_setup.sh)")
def test_transformers_autotokenizer_loads_offline(model_dir: Path, tmp_path: Path) -> None:
    py = _vllm_python()
    assert py is not None
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    script = (
        "import sys, json\n"
        "from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hello pod'}], add_generation_prompt=True)\n"
        "if hasattr(ids, 'input_ids'): ids = ids['input_ids']\n"
        "print(json.dumps({'ids': list(ids), 'text': t.decode(ids), 'bos': t.bos_token_id, 'eos': t.eos_token_id,"
        " 'enc': t('hi there')['input_ids']}))\n"
    )
    proc = subprocess.run(
        [str(py), "-c", script, str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = json.loads((model_dir / "config.json").read_text())
    assert out["bos"] == cfg["bos_token_id"] and out["eos"] == cfg["eos_token_id"]
    assert out["text"] == f"{BOS_TOKEN}{IM_START}user\nhello pod{IM_END}\n{IM_START}assistant\n"
    assert out["ids"][0] == cfg["bos_token_id"]
    assert out["enc"][0] == cfg["bos_token_id"]
