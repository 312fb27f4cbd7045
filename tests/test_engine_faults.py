"""Faults inside the engine, seen through HTTP: a fault caused by one request fails that
request alone while the others go on; a step that fails outside any request's share ends
the streams in flight with an error event then [DONE]; a dead engine thread makes /health
and new requests 503."""

import json
import threading

import pytest
import requests

MODEL = "Qwen2-7B-Instruct"


class EngineThreadKilled(BaseException):
    """Escapes every `except Exception`: ends the engine thread."""


@pytest.fixture(scope="module")
def server(start_inproc_server):
    with start_inproc_server(max_concurrent_requests=4) as srv:
        yield srv


def fail_after(monkeypatch, engine, steps: int, error: BaseException) -> None:
    """Make the engine's step raise `error` after `steps` good steps."""
    step, calls = engine.step, [0]

    def faulty():
        calls[0] += 1
        if calls[0] > steps:
            raise error
        return step()

    monkeypatch.setattr(engine, "step", faulty)


def stream_events(base_url: str) -> list:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 64,
            "temperature": 0, "ignore_eos": True, "stream": True}
    events = []
    with requests.post(f"{base_url}/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def generation_tokens(base_url: str) -> float:
    text = requests.get(f"{base_url}/metrics", timeout=30).text
    return float(text.split("\nxllm_generation_tokens_total ")[1].split()[0])


def test_a_failed_step_ends_the_stream_with_an_error_then_done(server, monkeypatch):
    tokens_before = generation_tokens(server.base_url)
    fail_after(monkeypatch, server.engine.engine, 4, RuntimeError("step fault"))
    events = stream_events(server.base_url)
    monkeypatch.undo()
    streamed = sum(1 for e in events[:-2] if e.get("choices") and e["choices"][0]["text"])
    assert generation_tokens(server.base_url) - tokens_before >= streamed > 0  # counted
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "INTERNAL" and error["type"] == "internal_error"
    assert "step fault" not in error["message"]
    assert any(e.get("choices") for e in events[:-2])  # text came before the fault
    assert requests.get(f"{server.base_url}/health", timeout=30).status_code == 200
    stats = server.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    assert requests.post(f"{server.base_url}/v1/completions", json=body,
                         timeout=120).status_code == 200


POISON = 31337  # a prompt starting with this token id makes the injected fault fire


def poison(monkeypatch, engine, where: str) -> None:
    """Make the engine raise while serving a request whose prompt starts with POISON: in the
    forward pass ("compute": the step's batch and the request's own share) or while the
    request takes its sampled token ("apply")."""
    if where == "compute":
        run = engine.runner.run

        def faulty_run(inputs):
            if any(inp.prompt.token_ids[0] == POISON for inp in inputs):
                raise RuntimeError("injected fault")
            return run(inputs)

        monkeypatch.setattr(engine.runner, "run", faulty_run)
    else:
        append = engine._append

        def faulty_append(seq, token, logprob):
            if seq.prompt.token_ids[0] == POISON:
                raise RuntimeError("injected fault")
            return append(seq, token, logprob)

        monkeypatch.setattr(engine, "_append", faulty_append)


def completion(base_url: str, prompt, max_tokens: int = 24) -> requests.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    return requests.post(f"{base_url}/v1/completions", json=body, timeout=300)


@pytest.mark.parametrize("where", ["compute", "apply"])
def test_a_fault_fails_only_the_request_that_causes_it(server, monkeypatch, where):
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    alone = [completion(server.base_url, p).json()["choices"][0]["text"] for p in prompts]
    poison(monkeypatch, server.engine.engine, where)
    results: dict[int, requests.Response] = {}

    def run(i: int) -> None:
        results[i] = completion(server.base_url, prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    bad = completion(server.base_url, [POISON, 504, 3575, 282], max_tokens=200)
    for thread in threads:
        thread.join()
    monkeypatch.undo()
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "INTERNAL"
    assert "injected" not in bad.json()["error"]["message"]
    for i in range(len(prompts)):
        choice = results[i].json()["choices"][0]
        assert results[i].status_code == 200 and choice["finish_reason"] == "length"
        assert choice["text"] == alone[i], f"request {i} changed by its neighbour's fault"
    stats = server.engine.stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


# Last: it leaves this module's server dead.
def test_a_dead_engine_thread_ends_streams_and_makes_health_503(server, monkeypatch):
    fail_after(monkeypatch, server.engine.engine, 3, EngineThreadKilled())
    events = stream_events(server.base_url)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "UNAVAILABLE"
    health = requests.get(f"{server.base_url}/health", timeout=30)
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy" and "died" in health.json()["reason"]
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}]}
    resp = requests.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "UNAVAILABLE"
