"""GET /metrics (Prometheus text) and POST /sleep, /wakeup on the in-process server."""

from __future__ import annotations

import re
import time

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"
# Over two 16-token blocks, so a repeat of it hits the prefix cache (stale after a sleep
# unless the cache is forgotten with the KV contents).
LONG_PROMPT = (
    "The history of the city begins with a small fishing village on the river bank, where "
    "traders from the north and the south met every summer to exchange salt, wool and iron. "
    "Over the centuries the village grew into"
)
SAMPLE_LINE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? (\S+)$'
)


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value for every sample line; asserts the exposition syntax."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert not line or line.startswith(("# HELP ", "# TYPE ")), line
            continue
        match = SAMPLE_LINE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[match.group(1) + (match.group(2) or "")] = float(match.group(4))
    return samples


def get_metrics(server) -> dict[str, float]:
    resp = requests.get(f"{server.base_url}/metrics", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(resp.text)


def complete(server, prompt: str = LONG_PROMPT, max_tokens: int = 8) -> requests.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return requests.post(f"{server.base_url}/v1/completions", json=body, timeout=300)


def greedy_text(server) -> str:
    resp = complete(server)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def post(server, path: str, body: dict | None = None) -> requests.Response:
    return requests.post(f"{server.base_url}{path}", json=body, timeout=300)


def requests_total(samples: dict[str, float], endpoint: str, status: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith("xllm_requests_total{")
               and f'endpoint="{endpoint}"' in k and f'status="{status}"' in k)


def test_metrics_text_and_counters(inproc_server):
    before = get_metrics(inproc_server)
    assert complete(inproc_server).status_code == 200
    resp = post(inproc_server, "/v1/completions", {"model": "no-such-model", "prompt": "x"})
    assert resp.status_code == 404
    after = get_metrics(inproc_server)

    assert requests_total(after, "/v1/completions", "200") == \
        requests_total(before, "/v1/completions", "200") + 1
    assert requests_total(after, "/v1/completions", "404") == \
        requests_total(before, "/v1/completions", "404") + 1
    assert 'xllm_requests_total{endpoint="/v1/completions",status="404",outcome="error"}' in after
    assert 0.0 <= after["xllm_kv_cache_usage_ratio"] <= 1.0
    assert 0.0 <= after["xllm_prefix_cache_hit_rate"] <= 1.0
    for gauge in ("xllm_num_requests_running", "xllm_num_requests_waiting"):
        assert after[gauge] >= 0
    prompt_len = len(inproc_server.engine.tokenizer.encode(LONG_PROMPT))
    assert after["xllm_prompt_tokens_total"] - before["xllm_prompt_tokens_total"] == prompt_len
    assert after["xllm_generation_tokens_total"] - before["xllm_generation_tokens_total"] == 8
    for name in ("xllm_time_to_first_token_seconds", "xllm_inter_token_latency_seconds",
                 "xllm_e2e_request_latency_seconds"):
        buckets = [(k, v) for k, v in after.items() if k.startswith(name + "_bucket{")]
        assert buckets and buckets[-1][0].endswith('le="+Inf"}')
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name} buckets are not cumulative"
        assert counts[-1] == after[name + "_count"]
        assert after[name + "_sum"] >= 0
    assert after["xllm_time_to_first_token_seconds_count"] == \
        before["xllm_time_to_first_token_seconds_count"] + 1
    assert after["xllm_e2e_request_latency_seconds_count"] == \
        before["xllm_e2e_request_latency_seconds_count"] + 1
    # 8 tokens, one per step: 7 gaps between outputs.
    assert after["xllm_inter_token_latency_seconds_count"] - \
        before["xllm_inter_token_latency_seconds_count"] == 7


def test_prefix_cache_hit_rate_follows_block_manager(inproc_server):
    complete(inproc_server)
    complete(inproc_server)  # the same long prompt again: its full blocks are cached
    samples = get_metrics(inproc_server)
    bm = inproc_server.engine.engine.block_manager
    assert samples["xllm_prefix_cache_hits_total"] == bm.hits > 0
    assert samples["xllm_prefix_cache_queries_total"] == bm.queries
    assert samples["xllm_prefix_cache_hit_rate"] == pytest.approx(bm.hits / bm.queries)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wakeup_keeps_greedy_output(inproc_server, level):
    expected = greedy_text(inproc_server)
    assert greedy_text(inproc_server) == expected  # through the prefix cache too
    try:
        resp = post(inproc_server, "/sleep", {"level": level})
        assert resp.status_code == 200, resp.text
        assert post(inproc_server, "/sleep", {"level": level}).status_code == 200  # harmless

        resp = complete(inproc_server)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "UNAVAILABLE"
        resp = post(inproc_server, "/v1/chat/completions", {
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "UNAVAILABLE"

        health = requests.get(f"{inproc_server.base_url}/health", timeout=30)
        assert health.status_code == 200
        assert health.json() == {"status": "healthy", "sleeping": True}
        assert get_metrics(inproc_server)["xllm_sleeping"] == 1
        runner = inproc_server.engine.engine.runner
        assert runner.k_cache is None and runner.v_cache is None
        assert (runner.model is None) == (level == 2)
    finally:
        resp = post(inproc_server, "/wakeup")
    assert resp.status_code == 200, resp.text
    assert post(inproc_server, "/wakeup").status_code == 200  # harmless
    assert requests.get(f"{inproc_server.base_url}/health", timeout=30).json() == \
        {"status": "healthy"}
    assert greedy_text(inproc_server) == expected
    assert greedy_text(inproc_server) == expected  # the prefix cache refilled after wakeup


def test_sleep_rejects_bad_level(inproc_server):
    resp = post(inproc_server, "/sleep", {"level": 3})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert get_metrics(inproc_server)["xllm_sleeping"] == 0


def test_sleep_with_request_in_flight_is_refused(inproc_server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1900,
            "ignore_eos": True, "stream": True, "temperature": 0}
    with requests.post(f"{inproc_server.base_url}/v1/completions", json=body, stream=True,
                       timeout=300) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: "))
        resp = post(inproc_server, "/sleep")
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["code"] == "INVALID_ARGUMENT" and "in flight" in error["message"]
        assert post(inproc_server, "/wakeup").status_code == 400
    deadline = time.monotonic() + 30
    while True:  # the stream's slot is released once the server notices the close
        resp = complete(inproc_server, max_tokens=2)
        if resp.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert resp.status_code == 200, resp.text
    assert get_metrics(inproc_server)["xllm_sleeping"] == 0
