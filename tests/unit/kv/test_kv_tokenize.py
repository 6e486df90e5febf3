"""Scheduler-side tokenization: HF dir + jinja chat template, the simulator's tokenizer, cache, fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from extproc.api import parse_request
from extproc.datalayer.tokenize import Tokenizers
from extproc.datalayer.simtokenizer import get_tokenizer


def chat(model: str, messages: list[dict[str, str]]) -> bytes:
    return json.dumps({"model": model, "messages": messages}).encode()


MSGS = [{"role": "system", "content": "You are a helpful model."}, {"role": "user", "content": "explain the cache"}]


def test_hf_chat_matches_template_and_raw_tokenizer(tiny_model_dir: Path) -> None:
    toks = Tokenizers({"tiny": {"kind": "hf", "path": str(tiny_model_dir)}})
    ids = toks.tokenize(parse_request("/v1/chat/completions", chat("tiny", MSGS)))
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    text = "<s><|im_start|>system\nYou are a helpful model.<|im_end|>\n<|im_start|>user\nexplain the cache<|im_end|>\n<|im_start|>assistant\n"
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert ids is not None and ids[0] == raw.token_to_id("<s>")


def test_hf_completion_adds_special_tokens_like_vllm(tiny_model_dir: Path) -> None:
    toks = Tokenizers({"tiny": {"kind": "hf", "path": str(tiny_model_dir)}})
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    req = parse_request("/v1/completions", json.dumps({"model": "tiny", "prompt": "the cache"}).encode())
    assert toks.tokenize(req) == raw.encode("the cache", add_special_tokens=True).ids
    req = parse_request("/v1/completions", json.dumps({"model": "tiny", "prompt": [5, 6, 7]}).encode())
    assert toks.tokenize(req) == [5, 6, 7]


def test_determinism_and_cache(tiny_model_dir: Path) -> None:
    a = Tokenizers({"tiny": {"kind": "hf", "path": str(tiny_model_dir)}})
    b = Tokenizers({"tiny": {"kind": "hf", "path": str(tiny_model_dir)}})
    req = parse_request("/v1/chat/completions", chat("tiny", MSGS))
    first = a.tokenize(req)
    assert first == a.tokenize(req) == b.tokenize(req)
    assert a.stats.cache_hits == 1 and b.stats.cache_hits == 0


def test_sim_kind_matches_the_simulator() -> None:
    toks = Tokenizers({"*": {"kind": "sim"}})
    req = parse_request("/v1/chat/completions", chat("any-model", MSGS))
    assert toks.tokenize(req) == get_tokenizer().encode_chat(MSGS)


def test_no_tokenizer_for_model_returns_none(tiny_model_dir: Path) -> None:
    toks = Tokenizers({"tiny": {"kind": "hf", "path": str(tiny_model_dir)}})
    assert toks.tokenize(parse_request("/v1/chat/completions", chat("other", MSGS))) is None
    assert toks.stats.no_tokenizer == 1


def test_adapter_uses_base_tokenizer_and_lora_key(tiny_model_dir: Path) -> None:
    toks = Tokenizers({"tiny": {"kind": "hf", "path": str(tiny_model_dir)}, "sql-lora": {"adapter_of": "tiny"}})
    a = toks.tokenize(parse_request("/v1/chat/completions", chat("tiny", MSGS)))
    b = toks.tokenize(parse_request("/v1/chat/completions", chat("sql-lora", MSGS)))
    assert a == b
    assert toks.lora_of("sql-lora") == "sql-lora" and toks.lora_of("tiny") is None


def test_template_error_falls_back(tmp_path: Path, tiny_model_dir: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.json").write_text((tiny_model_dir / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no system role') }}"}))
    toks = Tokenizers({"m": {"kind": "hf", "path": str(d)}})
    assert toks.tokenize(parse_request("/v1/chat/completions", chat("m", MSGS))) is None
    assert toks.stats.errors == 1


def test_bad_specs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Tokenizers({"m": {"kind": "hf", "path": str(tmp_path)}})
    with pytest.raises(ValueError):
        Tokenizers({"m": {"kind": "nope"}})
    with pytest.raises(ValueError):
        Tokenizers({"a": {"adapter_of": "missing"}})


def test_a_failed_request_is_not_tokenized_twice(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The handler tokenizes; a precise scorer asking again for the same request gets the same answer (here:
    None after a template error) without a second render."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "tokenizer.json").write_text((tiny_model_dir / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no system role') }}"}))
    toks = Tokenizers({"m": {"kind": "hf", "path": str(d)}})
    req = parse_request("/v1/chat/completions", chat("m", MSGS))
    assert toks.tokenize(req) is None and toks.tokenize(req) is None
    assert toks.stats.errors == 1 and toks.stats.calls == 2
    other = parse_request("/v1/chat/completions", chat("m", MSGS))
    assert toks.tokenize(other) is None and toks.stats.errors == 2  # a new request is tokenized afresh
