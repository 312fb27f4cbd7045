"""Graceful shutdown of the real `xllm serve` process: on SIGTERM it takes no new request (503),
lets those in flight finish within --shutdown-timeout, ends the rest, and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"  # the served name the other API tests use
STARTUP_TIMEOUT_S = 600.0  # the first start ever converts the tokenizer
LONG_TOKENS = 2000  # far longer than a short --shutdown-timeout lets run
PORT_LINE = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def chat(self, max_tokens: int, stream: bool = False) -> requests.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
        return requests.post(f"{self.url}/v1/chat/completions", json=body, stream=stream,
                             timeout=120)

    def running(self) -> int:
        """Sequences the engine runs, from /metrics."""
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        return int(re.search(r"^xllm_num_requests_running (\d+)", text, re.M).group(1))

    def wait_running(self, count: int, timeout: float = 60) -> None:
        wait_for(lambda: self.running() >= count, timeout, f"{count} running sequence(s)")

    def exit_code(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running {timeout} s later; log:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[float], Server]]:
    """Start `xllm serve` with a given --shutdown-timeout on a port of its choosing; every
    server started is killed at the end if it is still running."""
    started: list[subprocess.Popen] = []

    def start(shutdown_timeout: float) -> Server:
        log = tmp_path / f"server{len(started)}.log"
        cmd = [sys.executable, "-m", "xllm.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--served-model-name", MODEL, "--max-model-len", "2048", "--num-blocks", "256",
               "--shutdown-timeout", str(shutdown_timeout)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
        started.append(proc)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "xllm ready" not in (text := log.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start; log:\n{text[-4000:]}")
            time.sleep(0.2)
        port = PORT_LINE.search(text).group(1)
        return Server(proc, f"http://127.0.0.1:{port}", log)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def stream_events(server: Server, max_tokens: int, started: Future) -> list[str]:
    """Stream a chat; settle `started` once its first event is in."""
    with server.chat(max_tokens, stream=True) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                if not started.done():
                    started.set_result(None)
    return events


def assert_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "UNAVAILABLE"
    assert error["type"] and error["message"]


def test_sigterm_ends_what_outlasts_the_timeout(start_server) -> None:
    timeout = 3.0
    server = start_server(timeout)
    with ThreadPoolExecutor(2) as pool:
        stream_started: Future = Future()
        stream = pool.submit(stream_events, server, LONG_TOKENS, stream_started)
        plain = pool.submit(server.chat, LONG_TOKENS)
        stream_started.result(timeout=120)
        server.wait_running(2)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        wait_for(lambda: requests.get(f"{server.url}/health", timeout=10).status_code == 503,
                 timeout, "503 from /health")
        assert_unavailable(server.chat(5))  # a new request during the drain

        assert_unavailable(plain.result(timeout=60))
        events = stream.result(timeout=60)
        ended = time.monotonic() - signalled
    assert ended > timeout - 0.5  # they were given their time
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "UNAVAILABLE"
    assert all("choices" in json.loads(event) for event in events[:-2])
    assert server.exit_code() == 0, server.log_tail()


def test_sigterm_lets_a_short_request_finish(start_server) -> None:
    timeout = 30.0
    server = start_server(timeout)
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(server.chat, 50)
        server.wait_running(1)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        response = plain.result(timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 50
    assert server.exit_code() == 0, server.log_tail()
    assert time.monotonic() - signalled < timeout / 2  # no wait once it was done


def test_sigterm_when_idle_exits_at_once(start_server) -> None:
    timeout = 30.0
    server = start_server(timeout)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.exit_code() == 0, server.log_tail()
    assert time.monotonic() - signalled < 5


def test_second_signal_skips_the_wait(start_server) -> None:
    timeout = 30.0
    server = start_server(timeout)
    with ThreadPoolExecutor(1) as pool:
        stream_started: Future = Future()
        stream = pool.submit(stream_events, server, LONG_TOKENS, stream_started)
        stream_started.result(timeout=120)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in server.log.read_text(errors="replace"), 10,
                 "drain in the log")
        server.proc.send_signal(signal.SIGINT)
        events = stream.result(timeout=60)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "UNAVAILABLE"
    assert server.exit_code() == 0, server.log_tail()
    assert time.monotonic() - signalled < timeout / 2
