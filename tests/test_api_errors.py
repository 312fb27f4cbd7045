"""Bad requests get their status and an OpenAI error body (API.md section 5); the server lives."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import requests
from api_checks import assert_still_healthy, check_error

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


def nested(*path) -> tuple[str, ...]:
    """The accepted `param` values for a fault inside a field: the top-level request field
    (what the server names today) or the full path in one of OpenAI's spellings."""
    top, rest = path[0], path[1:]
    dotted = ".".join(str(p) for p in path)
    bracketed = top + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
    openai_style = top + "".join(f".[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
    return (top, dotted, bracketed, openai_style)


def check_param(error: dict, expected: str | tuple[str, ...] | None) -> None:
    """`error["param"]` names the field at fault (None when no field is at fault)."""
    accepted = expected if isinstance(expected, tuple) else (expected,)
    assert error["param"] in accepted, f"param should be {expected!r}: {error}"


# (id, path, raw body): no field is at fault, so `param` is null
RAW_CASES = [
    ("malformed_json_chat", CHAT, b'{"model": "Qwen2-7B-Instruct", "messages": ['),
    ("malformed_json_completions", COMPLETIONS, b'{"model": "x", prompt: hi}'),
    ("empty_body", CHAT, b""),
    ("array_body", CHAT, b"[1, 2, 3]"),
    ("string_body", COMPLETIONS, b'"hello"'),
    ("null_body", COMPLETIONS, b"null"),
]

# (id, path, JSON body, the `param` the error must carry: a field, or accepted spellings)
JSON_CASES = [
    ("missing_model_chat", CHAT, without(chat(), "model"), "model"),
    ("missing_model_completions", COMPLETIONS, without(completion(), "model"), "model"),
    ("missing_messages", CHAT, without(chat(), "messages"), "messages"),
    ("missing_prompt", COMPLETIONS, without(completion(), "prompt"), "prompt"),
    ("model_not_string", CHAT, chat(model=5), "model"),
    ("temperature_hot", CHAT, chat(temperature="hot"), "temperature"),
    ("messages_not_list", CHAT, chat(messages="hi"), "messages"),
    ("message_not_object", CHAT, chat(messages=["hi"]), nested("messages", 0)),
    (
        "message_without_role",
        CHAT,
        chat(messages=[{"content": "hi"}]),
        nested("messages", 0, "role"),
    ),
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
    ("n_string", CHAT, chat(n="2"), "n"),
    ("max_completion_tokens_zero", CHAT, chat(max_completion_tokens=0), "max_completion_tokens"),
    ("min_p_above_one", CHAT, chat(min_p=2), "min_p"),
    ("top_k_negative", COMPLETIONS, completion(top_k=-5), "top_k"),
    ("repetition_penalty_zero", CHAT, chat(repetition_penalty=0), "repetition_penalty"),
    (
        "frequency_penalty_out_of_range",
        COMPLETIONS,
        completion(frequency_penalty=-3),
        "frequency_penalty",
    ),
    (
        "stop_token_ids_out_of_range",
        COMPLETIONS,
        completion(stop_token_ids=[10**7]),
        "stop_token_ids",
    ),
    ("seed_out_of_range", COMPLETIONS, completion(seed=2**70), "seed"),
    ("beam_width_zero", CHAT, chat(beam_width=0), "beam_width"),
    ("logprobs_negative_completions", COMPLETIONS, completion(logprobs=-1), "logprobs"),
    ("logprobs_not_bool_chat", CHAT, chat(logprobs="yes"), "logprobs"),
    ("top_logprobs_negative", CHAT, chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("echo_not_bool", COMPLETIONS, completion(echo="yes"), "echo"),
    (
        "include_usage_not_bool",
        CHAT,
        chat(stream=True, stream_options={"include_usage": "yes"}),
        nested("stream_options", "include_usage"),
    ),
    ("stop_list_with_number", CHAT, chat(stop=["a", 5]), nested("stop", 1)),
    ("logit_bias_value_not_number", CHAT, chat(logit_bias={"10": "x"}), nested("logit_bias", "10")),
    ("empty_messages", CHAT, chat(messages=[]), "messages"),
    (
        "unknown_role",
        CHAT,
        chat(messages=[{"role": "wizard", "content": "hi"}]),
        nested("messages", 0, "role"),
    ),
    (
        "content_not_text",
        CHAT,
        chat(messages=[{"role": "user", "content": 5}]),
        nested("messages", 0, "content"),
    ),
    (
        "text_part_not_string",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        nested("messages", 0, "content", 0, "text"),
    ),
    ("empty_prompt_list", COMPLETIONS, completion(prompt=[]), "prompt"),
    ("empty_prompt_in_batch", COMPLETIONS, completion(prompt=[[1], []]), "prompt"),
    ("prompt_token_id_out_of_range", COMPLETIONS, completion(prompt=[10**7]), "prompt"),
    ("prompt_token_id_negative", COMPLETIONS, completion(prompt=[-1]), "prompt"),
]


@pytest.mark.parametrize(("path", "raw"), [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_bad_body(server_url, path, raw):
    resp = requests.post(
        server_url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60
    )
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    check_param(error, None)
    assert_still_healthy(server_url)


@pytest.mark.parametrize(
    ("path", "body", "param"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_invalid_argument(server_url, path, body, param):
    resp = requests.post(server_url + path, json=body, timeout=60)
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    check_param(error, param)
    assert_still_healthy(server_url)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_unknown_model(server_url, path):
    body = (chat if path == CHAT else completion)(model="no-such-model")
    error = check_error(requests.post(server_url + path, json=body, timeout=60), 404, "UNKNOWN")
    check_param(error, "model")
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
    check_param(error, "prompt")
    assert_still_healthy(server_url)


def test_text_prompt_longer_than_context(server_url):
    limit = max_model_len(server_url)
    messages = [{"role": "user", "content": "hello " * (limit + 200)}]
    resp = requests.post(server_url + CHAT, json=chat(messages=messages), timeout=120)
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    assert str(limit) in error["message"], error
    check_param(error, "messages")  # chat has no `prompt` field: the messages are at fault
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
    check_param(error, "max_tokens")
    assert_still_healthy(server_url)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_chat_prompt_plus_max_tokens_over_context(server_url, field):
    """The chat field that set the budget is the one named."""
    limit = max_model_len(server_url)
    # about one token per word: a prompt well inside the context, too long with 1000 more
    messages = [{"role": "user", "content": "hello " * (limit - 300)}]
    body = without(chat(messages=messages), "max_tokens") | {field: 1000}
    resp = requests.post(server_url + CHAT, json=body, timeout=120)
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    assert str(limit) in error["message"] and "1000" in error["message"], error
    check_param(error, field)
    assert_still_healthy(server_url)


def test_streamed_too_long_prompt_is_plain_400(server_url):
    limit = max_model_len(server_url)
    body = completion(prompt=[100] * (limit + 10), stream=True)
    error = check_error(requests.post(server_url + COMPLETIONS, json=body, timeout=120), 400,
                        "INVALID_ARGUMENT")  # fmt: skip
    check_param(error, "prompt")
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
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    check_param(error, nested("messages", 0, "content", 1))
    assert_still_healthy(server_url)


def test_text_parts_are_accepted(server_url):
    """A content list of text parts alone is fine for a text model."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    resp = requests.post(server_url + CHAT, json=chat(messages=messages), timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"


def test_no_422_for_any_bad_input(server_url):
    """FastAPI's default validation reply (422, {"detail": ...}) never leaks out."""
    cases = [
        ({"model": MODEL}, ("messages",)),
        ({"messages": 1}, ("model", "messages")),  # two faults: either may be named
        ({"model": MODEL, "messages": [], "n": "x"}, ("n", "messages")),
    ]
    for body, params in cases:
        resp = requests.post(server_url + CHAT, json=body, timeout=60)
        assert resp.status_code == 400, resp.text
        assert "detail" not in resp.json()
        check_param(check_error(resp, 400, "INVALID_ARGUMENT"), params)


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
