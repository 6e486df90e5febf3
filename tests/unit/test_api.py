import json

import pytest

from extproc.api import RequestError, api_for_path, parse_request


def body(**kw):
    return json.dumps(kw).encode()


def test_paths():
    assert api_for_path("/v1/chat/completions") == "chat"
    assert api_for_path("/v1/completions?x=1") == "completions"
    assert api_for_path("/v1/embeddings") == "embeddings"
    assert api_for_path("/v1/responses") == "responses"
    assert api_for_path("/v1/models") is None


def test_completions_string_and_list():
    r = parse_request("/v1/completions", body(model="m", prompt="hello", max_tokens=5, stream=True))
    assert (r.api, r.model, r.prompt_text, r.max_tokens, r.stream) == ("completions", "m", "hello", 5, True)
    r = parse_request("/v1/completions", body(model="m", prompt=["a", "b"]))
    assert r.prompt_text == "ab"
    r = parse_request("/v1/completions", body(model="m", prompt=[1, 2, 3]))
    assert r.prompt_text == "1 2 3"


def test_chat_content_parts_and_max_completion_tokens():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = parse_request("/v1/chat/completions", body(model="m", messages=msgs, max_completion_tokens=7, max_tokens=3))
    assert r.api == "chat" and r.max_tokens == 7
    assert json.loads(r.prompt_text) == msgs


def test_embeddings_and_responses():
    assert parse_request("/v1/embeddings", body(model="e", input=["x", "y"])).max_tokens == 0
    r = parse_request("/v1/responses", body(model="m", input="q", instructions="be brief", max_output_tokens=9))
    assert r.prompt_text.startswith("be brief") and r.max_tokens == 9


@pytest.mark.parametrize(
    "path,raw,status,code",
    [
        ("/v1/completions", b"{not json", 400, "invalid_json"),
        ("/v1/completions", b"[1,2]", 400, "invalid_type"),
        ("/v1/completions", b"", 400, "empty_body"),
        ("/v1/completions", body(prompt="x"), 400, "missing_field"),
        ("/v1/completions", body(model=3, prompt="x"), 400, "invalid_type"),
        ("/v1/completions", body(model="m"), 400, "missing_field"),
        ("/v1/completions", body(model="m", prompt="x", max_tokens="9"), 400, "invalid_type"),
        ("/v1/completions", body(model="m", prompt="x", stream="yes"), 400, "invalid_type"),
        ("/v1/chat/completions", body(model="m"), 400, "missing_field"),
        ("/v1/chat/completions", body(model="m", messages=[]), 400, "invalid_type"),
        ("/v1/chat/completions", body(model="m", messages=[{"role": "user"}]), 400, "missing_field"),
        ("/v1/chat/completions", body(model="m", messages=["x"]), 400, "invalid_type"),
        ("/v1/embeddings", body(model="m"), 400, "missing_field"),
        ("/v1/completions", b"\xff\xfe\x00", 400, "invalid_json"),
        ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, "invalid_json"),
    ],
)
def test_errors(path, raw, status, code):
    with pytest.raises(RequestError) as ei:
        parse_request(path, raw)
    assert ei.value.status == status
    assert ei.value.code == code
    err = json.loads(ei.value.body())["error"]
    assert set(err) == {"message", "type", "code"}


def test_body_limit():
    with pytest.raises(RequestError) as ei:
        parse_request("/v1/completions", body(model="m", prompt="x" * 100), max_body_bytes=50)
    assert ei.value.status == 413


def test_control_headers():
    h = {
        "x-gateway-inference-objective": "batch",
        "x-gateway-inference-fairness-id": "tenant-a",
        "x-slo-ttft-ms": "250",
        "x-slo-tpot-ms": "20",
        "x-gateway-model-name-rewrite": "real-model",
    }
    r = parse_request("/v1/completions", body(model="alias", prompt="x"), h, priority_of_objective={"batch": -1})
    assert r.priority == -1 and r.sheddable
    assert r.fairness_id == "tenant-a" and r.slo_ttft_ms == 250 and r.slo_tpot_ms == 20
    assert r.target_model == "real-model" and r.model == "alias"
    with pytest.raises(RequestError):
        parse_request("/v1/completions", body(model="m", prompt="x"), {"x-slo-ttft-ms": "soon"})
