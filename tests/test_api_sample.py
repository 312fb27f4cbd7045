"""POST /v1/sample through the real server (API.md section 4): the seed's request as written,
matches at the start, none, overlapping, many in a long prompt, the refusals, the log rule
and the metrics."""

import json
import logging
import re
import socket
import time
from urllib.parse import urlsplit

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"
SEED_SAMPLE = (
    '{ "model": "Qwen2-7B-Instruct", "prompt": "问题:<emb_0> 是否命中。结论:<emb_0>", '
    '"selector": { "type": "literal", "value": "<emb_0>" }, "logprobs": 5, '
    '"request_id": "sample-demo-001" }'
)


def sample(base_url: str, body: str | dict) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(base_url + "/v1/sample", data=data.encode(), timeout=300,
                         headers={"Content-Type": "application/json"})


def body(prompt: str, value: str = "<emb_0>", **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, "selector": {"type": "literal", "value": value},
            **fields}


def check_point(choice: dict, index: int, k: int = 5) -> None:
    assert choice["index"] == index and choice["finish_reason"] == "selector_match"
    lp = choice["logprobs"]
    assert 1 <= len(lp["tokens"]) == len(lp["token_ids"]) == len(lp["token_logprobs"]) <= k
    assert lp["token_logprobs"] == sorted(lp["token_logprobs"], reverse=True)
    assert all(v <= 0 for v in lp["token_logprobs"])
    assert choice["text"] == lp["tokens"][0]


def test_seed_sample_request(server_url):
    resp = sample(server_url, SEED_SAMPLE)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"] == "sample-demo-001" and out["object"] == "sample_completion"
    assert out["model"] == MODEL and isinstance(out["created"], int)
    assert len(out["choices"]) == 2
    for i, choice in enumerate(out["choices"]):
        check_point(choice, i)
    usage = out["usage"]
    assert usage["completion_tokens"] == 2 and usage["prompt_tokens"] > 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + 2


def test_a_match_at_the_start_has_no_distribution(server_url):
    out = sample(server_url, body("<emb_0> is the answer: <emb_0>", logprobs=3)).json()
    first, second = out["choices"]
    assert first == {"index": 0, "text": "", "finish_reason": "empty_logprobs",
                     "logprobs": {"tokens": [], "token_ids": [], "token_logprobs": []}}
    check_point(second, 1, k=3)
    assert out["usage"]["completion_tokens"] == 1
    assert out["id"].startswith("sample-")


def test_no_match_is_an_empty_answer(server_url):
    resp = sample(server_url, body("nothing to see here"))
    assert resp.status_code == 200
    out = resp.json()
    assert out["choices"] == [] and out["usage"]["completion_tokens"] == 0
    assert out["usage"]["prompt_tokens"] > 0


def test_overlapping_candidates_match_once(server_url):
    out = sample(server_url, body("x aaa", value="aa")).json()
    assert len(out["choices"]) == 1
    check_point(out["choices"][0], 0)


def test_many_matches_in_a_long_prompt_equal_each_prefix_alone(server_url):
    words = ("river", "stone", "cloud", "ember", "field", "harbor", "lantern", "meadow")
    text = ""
    for i in range(60):
        text += " ".join(words[(i + j) % 8] for j in range(40)) + " [M] "
    out = sample(server_url, body(text, value="[M]", logprobs=4)).json()
    assert len(out["choices"]) == 60 and out["usage"]["prompt_tokens"] > 2000
    for i, choice in enumerate(out["choices"]):
        check_point(choice, i, k=4)
    # the point at a match is what the prompt up to it gives, asked alone
    for i in (0, 17, 59):
        cut = text[: [m.start() for m in re.finditer(re.escape("[M]"), text)][i]] + "[M]"
        alone = sample(server_url, body(cut, value="[M]", logprobs=4)).json()["choices"][-1]
        assert alone["logprobs"]["token_ids"] == out["choices"][i]["logprobs"]["token_ids"]
        assert alone["logprobs"]["token_logprobs"] == pytest.approx(
            out["choices"][i]["logprobs"]["token_logprobs"], abs=1e-4)


@pytest.mark.parametrize(("payload", "param"), [
    ({"model": MODEL, "prompt": "a <x>"}, "selector"),
    ({"model": MODEL, "prompt": "a <x>", "selector": {"type": "literal"}}, "selector"),
    (body("a <x>", value=""), "selector"),
    ({**body("a <x>", value="<x>"), "selector": {"type": "regex", "value": "<x>"}},
     "selector"),
    (body("a <x>", value="<x>", logprobs=0), "logprobs"),
    (body("a <x>", value="<x>", logprobs=6), "logprobs"),
    (body("", value="<x>"), "prompt"),
    (body("word " * 6000 + "<x>", value="<x>"), "prompt"),
    ({"prompt": "a <x>", "selector": {"type": "literal", "value": "<x>"}}, "model"),
])  # fmt: skip
def test_invalid_sample_requests(server_url, payload, param):
    resp = sample(server_url, payload)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["param"] == param
    assert "<x>" not in error["message"] and "word word" not in error["message"]


def test_unknown_model_is_404(server_url):
    resp = sample(server_url, {**body("a <x>", value="<x>"), "model": "nope"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "UNKNOWN"


# --- the log rule and the metrics, on an in-process server whose log is captured ---------


@pytest.fixture(scope="module")
def logged_server(start_inproc_server):
    with start_inproc_server(max_concurrent_requests=8) as server:
        yield server


SECRET = "zanzibar quokka telescope"  # a distinctive prompt


def test_the_log_never_holds_the_prompt(logged_server, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, every level
    prompt = f"{SECRET} first <emb_0> then {SECRET} again <emb_0>"
    ok = sample(logged_server.base_url, body(prompt, request_id="log-check-1"))
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    bad = sample(logged_server.base_url, body(prompt, logprobs=9))
    assert bad.status_code == 400 and SECRET not in bad.text
    long = sample(logged_server.base_url, body(f"{SECRET} " * 3000 + "<emb_0>"))
    assert long.status_code == 400 and SECRET not in long.text
    time.sleep(0.5)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "log-check-1" in text and "match_count 2" in text
    for part in SECRET.split() + ["first", "again"]:
        assert part not in text, f"the log quotes the prompt ({part!r})"


def metric(base_url: str, name: str) -> float:
    text = requests.get(base_url + "/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_samples_and_disconnects(logged_server):
    url = logged_server.base_url
    before = (metric(url, "xllm_sample_requests_total"), metric(url, "xllm_sample_points_total"))
    assert sample(url, body("a <p> b <p> c <p>", value="<p>")).status_code == 200
    after = (metric(url, "xllm_sample_requests_total"), metric(url, "xllm_sample_points_total"))
    assert after == (before[0] + 1, before[1] + 3)
    ok = 'xllm_requests_total{endpoint="/v1/sample",status="200",outcome="success"}'
    gone = 'xllm_requests_total{endpoint="/v1/sample",status="499",outcome="disconnected"}'
    counts = (metric(url, ok), metric(url, gone))
    # a client that leaves before its answer (a long prompt keeps the engine busy)
    payload = json.dumps(body("tell me more " * 600 + "<p>", value="<p>")).encode()
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(b"POST /v1/sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        time.sleep(0.3)
    deadline = time.monotonic() + 60
    while metric(url, gone) == counts[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(url, gone) == counts[1] + 1
    assert metric(url, ok) == counts[0]
