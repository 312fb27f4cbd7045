"""Bad requests get their status and an OpenAI error body (API.md section 5); the server lives."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import requests

MODEL = "Qwen2-7B-Instruct"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
TINY_PNG = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAE"
    "hQGAhKmMIQAAAABJRU5ErkJggg=="
)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2} | fields


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2} | fields


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


def check_error(resp: requests.Response, status: int, code: str) -> dict:
    """Assert the status and OpenAI error shape; return the `error` object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert "Traceback" not in resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code", "param"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == code
    return error


def check_names_field(error: dict, field: str) -> None:
    assert error["param"] == field or field in error["message"], error


def assert_still_healthy(server_url: str) -> None:
    resp = requests.get(f"{server_url}/health", timeout=30)
    assert resp.status_code == 200
    assert resp.json() == {"status": "healthy"}


# (id, path, raw body, field the error should name or None)
RAW_CASES = [
    ("malformed_json_chat", CHAT, b'{"model": "Qwen2-7B-Instruct", "messages": [', None),
    ("malformed_json_completions", COMPLETIONS, b'{"model": "x", prompt: hi}', None),
    ("empty_body", CHAT, b"", None),
    ("array_body", CHAT, b"[1, 2, 3]", None),
    ("string_body", COMPLETIONS, b'"hello"', None),
    ("null_body", COMPLETIONS, b"null", None),
]

# (id, path, JSON body, field the error should name)
JSON_CASES = [
    ("missing_model_chat", CHAT, without(chat(), "model"), "model"),
    ("missing_model_completions", COMPLETIONS, without(completion(), "model"), "model"),
    ("missing_messages", CHAT, without(chat(), "messages"), "messages"),
    ("missing_prompt", COMPLETIONS, without(completion(), "prompt"), "prompt"),
    ("model_not_string", CHAT, chat(model=5), "model"),
    ("temperature_hot", CHAT, chat(temperature="hot"), "temperature"),
    ("messages_not_list", CHAT, chat(messages="hi"), "messages"),
    ("message_not_object", CHAT, chat(messages=["hi"]), "messages"),
    ("message_without_role", CHAT, chat(messages=[{"content": "hi"}]), "role"),
    ("prompt_wrong_type", COMPLETIONS, completion(prompt={"text": "hi"}), "prompt"),
    ("max_tokens_float", CHAT, chat(max_tokens=1.5), "max_tokens"),
    ("max_tokens_string", COMPLETIONS, completion(max_tokens="10"), "max_tokens"),
    ("stream_not_bool", COMPLETIONS, completion(stream="yes"), "stream"),
    ("stop_wrong_type", COMPLETIONS, completion(stop=5), "stop"),
    ("temperature_negative", CHAT, chat(temperature=-1), "temperature"),
    ("top_p_zero", CHAT, chat(top_p=0), "top_p"),
    ("top_p_above_one", COMPLETIONS, completion(top_p=1.5), "top_p"),
    ("n_zero", CHAT, chat(n=0), "n"),
    ("max_tokens_zero", COMPLETIONS, completion(max_tokens=0), "max_tokens"),
    ("max_tokens_negative", CHAT, chat(max_tokens=-5), "max_tokens"),
    ("logprobs_30_completions", COMPLETIONS, completion(logprobs=30), "logprobs"),
    ("top_logprobs_30_chat", CHAT, chat(logprobs=True, top_logprobs=30), "top_logprobs"),
    ("presence_penalty_out_of_range", CHAT, chat(presence_penalty=5), "presence_penalty"),
    ("logit_bias_out_of_range", COMPLETIONS, completion(logit_bias={"100": 500}), "logit_bias"),
    ("logit_bias_bad_key", COMPLETIONS, completion(logit_bias={"abc": 1}), "logit_bias"),
    ("stream_bad_temperature", CHAT, chat(stream=True, temperature=-1), "temperature"),
    ("stream_completions_bad_n", COMPLETIONS, completion(stream=True, n=0), "n"),
]


@pytest.mark.parametrize(
    ("path", "raw", "field"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES]
)
def test_bad_body(server_url, path, raw, field):
    resp = requests.post(
        server_url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60
    )
    check_error(resp, 400, "INVALID_ARGUMENT")
    assert_still_healthy(server_url)


@pytest.mark.parametrize(
    ("path", "body", "field"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_invalid_argument(server_url, path, body, field):
    resp = requests.post(server_url + path, json=body, timeout=60)
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    check_names_field(error, field)
    assert_still_healthy(server_url)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_unknown_model(server_url, path):
    body = (chat if path == CHAT else completion)(model="no-such-model")
    error = check_error(requests.post(server_url + path, json=body, timeout=60), 404, "UNKNOWN")
    check_names_field(error, "model")
    assert_still_healthy(server_url)


def max_model_len(server_url: str) -> int:
    return requests.get(f"{server_url}/v1/models", timeout=30).json()["data"][0]["max_model_len"]


def test_token_prompt_longer_than_context(server_url):
    limit = max_model_len(server_url)
    n = limit + 100
    resp = requests.post(
        server_url + COMPLETIONS, json=completion(prompt=[100] * n, max_tokens=1), timeout=120
    )
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    assert str(limit) in error["message"] and str(n) in error["message"], error
    assert_still_healthy(server_url)


def test_text_prompt_longer_than_context(server_url):
    limit = max_model_len(server_url)
    messages = [{"role": "user", "content": "hello " * (limit + 200)}]
    resp = requests.post(server_url + CHAT, json=chat(messages=messages), timeout=120)
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    assert str(limit) in error["message"], error
    assert_still_healthy(server_url)


def test_prompt_plus_max_tokens_over_context(server_url):
    limit = max_model_len(server_url)
    prompt_len, max_tokens = limit - 50, 200
    resp = requests.post(
        server_url + COMPLETIONS,
        json=completion(prompt=[100] * prompt_len, max_tokens=max_tokens),
        timeout=120,
    )
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    message = error["message"]
    assert str(limit) in message, error
    assert str(max_tokens) in message or str(prompt_len + max_tokens) in message, error
    assert_still_healthy(server_url)


def test_streamed_too_long_prompt_is_plain_400(server_url):
    limit = max_model_len(server_url)
    body = completion(prompt=[100] * (limit + 10), stream=True)
    check_error(requests.post(server_url + COMPLETIONS, json=body, timeout=120), 400,
                "INVALID_ARGUMENT")  # fmt: skip
    assert_still_healthy(server_url)


def test_image_part_to_text_model(server_url):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{TINY_PNG}"}},
            ],
        }
    ]
    resp = requests.post(server_url + CHAT, json=chat(messages=messages), timeout=60)
    check_error(resp, 400, "INVALID_ARGUMENT")
    assert_still_healthy(server_url)


def test_text_parts_are_accepted(server_url):
    """A content list of text parts alone is fine for a text model."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    resp = requests.post(server_url + CHAT, json=chat(messages=messages), timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"


def test_no_422_for_any_bad_input(server_url):
    """FastAPI's default validation reply (422, {"detail": ...}) never leaks out."""
    for body in ({"model": MODEL}, {"messages": 1}, {"model": MODEL, "messages": [], "n": "x"}):
        resp = requests.post(server_url + CHAT, json=body, timeout=60)
        assert resp.status_code == 400, resp.text
        assert "detail" not in resp.json()


def test_server_still_serves_after_errors(server_url):
    assert_still_healthy(server_url)
    resp = requests.post(server_url + CHAT, json=chat(temperature=0), timeout=120)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"] is not None
    assert body["usage"]["completion_tokens"] <= 2


# --- RESOURCE_EXHAUSTED: the in-process server admits one request at a time -------------


def wait_until_served(base_url: str, timeout: float = 30.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = requests.post(base_url + COMPLETIONS, json=completion(), timeout=120)
        if resp.status_code != 429 or time.monotonic() > deadline:
            return resp
        time.sleep(0.2)


def test_too_many_requests(inproc_server):
    base = inproc_server.base_url
    assert wait_until_served(base).status_code == 200
    long_body = completion(max_tokens=500, stream=True, ignore_eos=True)
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", base + COMPLETIONS, json=long_body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # held: a dropped line iterator closes the connection
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:]).get("choices"):
                    break
            second = requests.post(base + CHAT, json=chat(), timeout=60)
            check_error(second, 429, "RESOURCE_EXHAUSTED")
            third = requests.post(base + COMPLETIONS, json=completion(stream=True), timeout=60)
            check_error(third, 429, "RESOURCE_EXHAUSTED")
    # once the first request is gone, the slot is free again
    resp = wait_until_served(base)
    assert resp.status_code == 200, resp.text
    assert requests.get(base + "/health", timeout=30).status_code == 200
