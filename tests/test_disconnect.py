"""A client that goes away mid-request leaves no KV blocks allocated once the engine notices."""

from __future__ import annotations

import json
import re
import select
import socket
import time
from urllib.parse import urlsplit

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


def metrics_gauges(server) -> dict[str, float]:
    """The engine gauges of GET /metrics: running and waiting sequences, KV-cache usage."""
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    gauges = {}
    for name in ("xllm_num_requests_running", "xllm_num_requests_waiting",
                 "xllm_kv_cache_usage_ratio"):  # fmt: skip
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} missing from /metrics:\n{text}"
        gauges[name] = float(match.group(1))
    return gauges


def check_running(server, n: int) -> None:
    """The engine has admitted the request: its n sequences run, none waits, blocks are held;
    the same seen through /metrics."""
    during = stats(server)
    assert during["num_running"] == n, during
    assert during["num_waiting"] == 0, during
    assert during["num_free_blocks"] < during["num_total_blocks"], during
    gauges = metrics_gauges(server)
    assert gauges["xllm_num_requests_running"] == n, gauges
    assert gauges["xllm_kv_cache_usage_ratio"] > 0, gauges


def check_idle_metrics(server) -> None:
    gauges = metrics_gauges(server)
    assert gauges == {"xllm_num_requests_running": 0, "xllm_num_requests_waiting": 0,
                      "xllm_kv_cache_usage_ratio": 0}, gauges  # fmt: skip


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


@pytest.fixture(scope="module")
def pair_server(start_inproc_server):
    """An in-process server that runs two sequences at once (an n=2 request)."""
    with start_inproc_server(max_concurrent_requests=2) as server:
        yield server


@pytest.mark.parametrize(
    ("path", "n", "server"),
    [("/v1/chat/completions", 1, "inproc_server"), ("/v1/completions", 2, "pair_server")],
    ids=["chat", "n2"],
)
def test_stream_disconnect_frees_blocks(request, path, n, server):
    inproc_server = request.getfixturevalue(server)
    wait_all_free(inproc_server, 60.0)  # leftovers of earlier tests
    check_idle_metrics(inproc_server)
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
            check_running(inproc_server, n)
    # the connection is closed here, long before the request could finish on its own
    wait_all_free(inproc_server, FREE_TIMEOUT_S)
    assert stats(inproc_server)["num_free_blocks"] == total
    check_idle_metrics(inproc_server)


def send_raw_post(base_url: str, path: str, body: dict) -> socket.socket:
    """POST `body` over a plain socket that the test can close at the moment it chooses."""
    url = urlsplit(base_url)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


def answered(sock: socket.socket) -> bytes | None:
    """What the server sent back so far, or None if it has sent nothing."""
    readable, _, _ = select.select([sock], [], [], 0)
    return sock.recv(65536) if readable else None


def admitted_raw_request(server, path: str, body: dict, n: int, timeout: float = 60.0):
    """A raw-socket request the engine is running (n sequences) and has not answered yet."""
    deadline = time.monotonic() + timeout
    sock = send_raw_post(server.base_url, path, body)
    while time.monotonic() < deadline:
        reply = answered(sock)
        if reply is not None:
            sock.close()
            if b" 429 " not in reply.split(b"\r\n", 1)[0]:
                pytest.fail(f"answered before it could be seen running: {reply[:500]!r}")
            time.sleep(0.2)  # the one slot is still held by an earlier request: retry
            sock = send_raw_post(server.base_url, path, body)
            continue
        s = stats(server)
        if s["num_running"] == n and s["num_free_blocks"] < s["num_total_blocks"]:
            return sock
        time.sleep(0.02)
    sock.close()
    pytest.fail(f"the request was not seen running within {timeout:.0f} s: {stats(server)}")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_non_streaming_disconnect_frees_blocks(inproc_server, path):
    wait_all_free(inproc_server, 60.0)
    check_idle_metrics(inproc_server)
    body = long_request(path, 1) | {"stream": False}
    sock = admitted_raw_request(inproc_server, path, body, n=1)
    try:
        time.sleep(0.5)  # let it decode a few tokens
        check_running(inproc_server, 1)
        assert answered(sock) is None, "the request finished before the client left"
    finally:
        sock.close()
    wait_all_free(inproc_server, FREE_TIMEOUT_S)
    check_idle_metrics(inproc_server)


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
