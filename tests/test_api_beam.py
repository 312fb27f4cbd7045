"""Beam search through the real server: the seed's two requests as written, the response
shape (beam_width choices, best first, logprobs with top alternatives, usage), and the
requests it refuses."""

import json

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"
# The seed document's two beam-search requests, byte for byte.
SEED_CHAT = (
    '{ "model": "Qwen2-7B-Instruct", "max_tokens": 20, "temperature": 0, "stream": false, '
    '"beam_width": 2, "logprobs": true, "top_logprobs": 4, "messages": [ { "role": "user", '
    '"content": "请简短介绍 xLLM。" } ] }'
)
SEED_COMPLETION = (
    '{ "model": "Qwen2-7B-Instruct", "prompt": "请简短介绍 xLLM。", "max_tokens": 20, '
    '"temperature": 0, "stream": false, "beam_width": 2, "logprobs": 4 }'
)


def post(base_url: str, path: str, body: str | dict) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(base_url + path, data=data.encode(), timeout=300,
                         headers={"Content-Type": "application/json"})


def test_seed_chat_beam_search(server_url):
    resp = post(server_url, "/v1/chat/completions", SEED_CHAT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    scores, total = [], 0
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        content = choice["logprobs"]["content"]
        assert 1 <= len(content) <= 20
        for entry in content:
            assert len(entry["top_logprobs"]) == 4
            tops = [t["logprob"] for t in entry["top_logprobs"]]
            assert tops == sorted(tops, reverse=True) and entry["logprob"] <= tops[0] + 1e-6
        total += len(content)
        scores.append(sum(e["logprob"] for e in content) / len(content))  # length_penalty 1
    assert body["choices"][0]["message"] != body["choices"][1]["message"]
    assert scores[0] >= scores[1] - 1e-5, "choices are not best first"
    assert body["usage"]["completion_tokens"] == total
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + total


def test_seed_completions_beam_search(server_url):
    resp = post(server_url, "/v1/completions", SEED_COMPLETION)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    total = 0
    for choice in body["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
        assert all(1 <= len(top) <= 4 for top in lp["top_logprobs"])
        assert choice["finish_reason"] in ("stop", "length")
        total += len(lp["tokens"])
    assert body["usage"]["completion_tokens"] == total


def test_beams_equal_the_engines_search_for_the_same_prompt(server_url):
    """Two requests with the same beam fields give the same beams (the search is
    deterministic), whatever temperature says."""
    body = {"model": MODEL, "prompt": "The best way to learn is", "max_tokens": 12,
            "beam_width": 3, "length_penalty": 0.5, "early_stopping": True}
    first = post(server_url, "/v1/completions", {**body, "temperature": 0}).json()
    second = post(server_url, "/v1/completions", {**body, "temperature": 1.5}).json()
    assert len(first["choices"]) == 3
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]


def test_beam_width_one_is_greedy(server_url):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12}
    greedy = post(server_url, "/v1/completions", {**body, "temperature": 0}).json()
    beam = post(server_url, "/v1/completions", {**body, "beam_width": 1, "temperature": 1.2})
    assert beam.status_code == 200
    assert beam.json()["choices"][0]["text"] == greedy["choices"][0]["text"]


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"beam_width": 2, "stream": True}, "stream", "stream"),
    ({"beam_width": 2, "n": 2}, "n", "beam_width"),
    ({"beam_width": 9}, "beam_width", "at most 8"),
    ({"beam_width": 0}, "beam_width", "at least 1"),
    ({"beam_width": 2, "length_penalty": "x"}, "length_penalty", "length_penalty"),
])  # fmt: skip
def test_refused_beam_requests(server_url, fields, param, words):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, **fields}
    resp = post(server_url, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["param"] == param
    assert words in error["message"]
