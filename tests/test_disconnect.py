"""A client that goes away mid-request leaves no KV blocks allocated once the engine notices."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import requests

MODEL = "Qwen2-7B-Instruct"
FREE_TIMEOUT_S = 10.0


def stats(server) -> dict:
    return server.engine.stats()


def all_blocks_free(server) -> bool:
    s = stats(server)
    return (
        s["num_free_blocks"] == s["num_total_blocks"]
        and s["num_running"] == 0
        and s["num_waiting"] == 0
    )


def wait_all_free(server, timeout: float) -> float:
    """Seconds until every block is free and nothing runs; fails the test on timeout."""
    start = time.monotonic()
    while not all_blocks_free(server):
        if time.monotonic() - start > timeout:
            pytest.fail(
                f"blocks still allocated {timeout:.0f} s after the disconnect: {stats(server)}"
            )
        time.sleep(0.05)
    return time.monotonic() - start


def long_request(path: str, n: int) -> dict:
    # 1900 new tokens take far longer than FREE_TIMEOUT_S on this machine.
    body = {"model": MODEL, "max_tokens": 1900, "ignore_eos": True, "stream": True,
            "temperature": 0.7, "n": n}  # fmt: skip
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    else:
        body["prompt"] = "Once upon a time"
    return body


def has_content(line: str) -> bool:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    for choice in json.loads(line[6:]).get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


@pytest.mark.parametrize(
    ("path", "n"), [("/v1/chat/completions", 1), ("/v1/completions", 2)], ids=["chat", "n2"]
)
def test_stream_disconnect_frees_blocks(inproc_server, path, n):
    wait_all_free(inproc_server, 60.0)  # leftovers of earlier tests
    total = stats(inproc_server)["num_total_blocks"]
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", inproc_server.base_url + path, json=long_request(path, n)) as r:
            assert r.status_code == 200
            got = 0
            lines = r.iter_lines()  # held: a dropped line iterator closes the connection
            for line in lines:
                got += has_content(line)
                if got >= 3:
                    break
            assert got >= 3
            during = stats(inproc_server)
            assert during["num_free_blocks"] < total, during
            assert during["num_running"] + during["num_waiting"] >= 1, during
    # the connection is closed here, long before the request could finish on its own
    wait_all_free(inproc_server, FREE_TIMEOUT_S)
    assert stats(inproc_server)["num_free_blocks"] == total


def test_non_streaming_disconnect_frees_blocks(inproc_server):
    wait_all_free(inproc_server, 60.0)
    body = long_request("/v1/completions", 1) | {"stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(inproc_server.base_url + "/v1/completions", json=body, timeout=3.0)
    wait_all_free(inproc_server, FREE_TIMEOUT_S)


def test_server_serves_after_disconnects(inproc_server):
    deadline = time.monotonic() + 30
    while True:
        resp = requests.post(
            inproc_server.base_url + "/v1/completions",
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0},
            timeout=120,
        )
        if resp.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] <= 3
    wait_all_free(inproc_server, FREE_TIMEOUT_S)
