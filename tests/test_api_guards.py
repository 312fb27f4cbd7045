"""The request guards of xllm.api.guards, through a real HTTP server: API key, Host allowlist,
CORS, content type, body size and body timeout, X-Request-Id; and the /sleep body checks,
405's code and 499 for a client gone mid-upload."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests
from api_checks import check_error

MODEL = "Qwen2-7B-Instruct"
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED_ORIGIN = "http://allowed.example"
MAX_BYTES = 64 * 1024
BODY_TIMEOUT_S = 1.0
STEP_DELAY_S = 0.025
CHAT = "/v1/chat/completions"
GENERATED_ID = re.compile(r"req-[0-9a-f]{32}")


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2} | fields  # fmt: skip


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server_logs() -> Iterator[LogRecords]:
    """Every log record of the module's server, xllm's from INFO up."""
    handler, root, xllm_logger = LogRecords(), logging.getLogger(), logging.getLogger("xllm")
    level = xllm_logger.level
    root.addHandler(handler)
    xllm_logger.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    xllm_logger.setLevel(level)


@pytest.fixture(scope="module")
def server(start_inproc_server, server_logs):
    """One in-process server with every guard on."""
    with start_inproc_server(
        max_concurrent_requests=4, api_key=KEY, allowed_hosts=("127.0.0.1", "localhost"),
        allowed_origins=(ALLOWED_ORIGIN,), max_request_bytes=MAX_BYTES,
        request_body_timeout=BODY_TIMEOUT_S,
    ) as srv:
        yield srv


def url(server, path: str) -> str:
    return server.base_url + path


def requests_total(server, endpoint: str, status: int) -> float:
    text = requests.get(url(server, "/metrics"), timeout=30).text
    match = re.search(rf'^xllm_requests_total{{endpoint="{re.escape(endpoint)}",'
                      rf'status="{status}",outcome="\w+"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_idle(server, timeout: float = 60.0) -> None:
    """Until the engine runs and waits for nothing (leftovers of earlier tests)."""
    deadline = time.monotonic() + timeout
    while (s := server.engine.stats())["num_running"] or s["num_waiting"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


# --- raw HTTP: bodies sent by hand ----------------------------------------------------------


def connect(server) -> socket.socket:
    parts = urlsplit(server.base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def head(server, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {urlsplit(server.base_url).netloc}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def raw_error(status: int, headers: dict[str, str], body: bytes, expected: int, code: str
              ) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    return error


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


JSON_HEADERS = {"Content-Type": "application/json", **AUTH}


# --- API key --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", CHAT, chat()), ("GET", "/v1/models", None), ("POST", "/wakeup", None),
    ("POST", "/sleep", {"level": 1}),
], ids=["chat", "models", "wakeup", "sleep"])
def test_api_key_missing_or_wrong_is_401(server, method, path, body):
    before = requests_total(server, path, 401)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
        resp = requests.request(method, url(server, path), json=body, headers=headers,
                                timeout=60)
        error = check_error(resp, 401, "UNAUTHENTICATED")
        assert error["type"] == "authentication_error"
        assert resp.headers["www-authenticate"] == "Bearer"
        assert KEY not in resp.text
    assert requests_total(server, path, 401) == before + 5  # counted like any answer


def test_api_key_right_is_served(server):
    resp = requests.get(url(server, "/v1/models"), headers=AUTH, timeout=60)
    assert resp.status_code == 200 and resp.json()["data"][0]["id"] == MODEL
    resp = requests.get(url(server, "/v1/models"), headers={"authorization": f"bearer  {KEY}"},
                        timeout=60)
    assert resp.status_code == 200  # the scheme is case-insensitive
    resp = requests.post(url(server, CHAT), json=chat(), headers=AUTH, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"


def test_health_and_metrics_need_no_key(server):
    assert requests.get(url(server, "/health"), timeout=30).status_code == 200
    resp = requests.get(url(server, "/metrics"), timeout=30)
    assert resp.status_code == 200 and "xllm_requests_total" in resp.text


# --- Host allowlist -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1234", "localhost:80"])
def test_allowed_host(server, host):
    resp = requests.get(url(server, "/v1/models"), headers={"Host": host, **AUTH}, timeout=30)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example",
                                  "127.0.0.2"])
def test_other_host_is_400(server, host):
    for path in ("/v1/models", "/health"):
        resp = requests.get(url(server, path), headers={"Host": host, **AUTH}, timeout=30)
        check_error(resp, 400, "INVALID_ARGUMENT")


# --- CORS -----------------------------------------------------------------------------------


def preflight(server, origin: str) -> requests.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
    return requests.options(url(server, CHAT), headers=headers, timeout=30)


def test_cors_preflight_of_allowed_origin_needs_no_key(server):
    resp = preflight(server, ALLOWED_ORIGIN)
    assert resp.status_code == 200, resp.text
    assert resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    allowed = resp.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    # the answers themselves, refusals included, are readable by the page
    for headers in (AUTH, {}):
        resp = requests.get(url(server, "/v1/models"), headers={"Origin": ALLOWED_ORIGIN,
                                                                **headers}, timeout=30)
        assert resp.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "x-request-id" in resp.headers["access-control-expose-headers"].lower()


def test_cors_other_origin_gets_no_allow_header(server):
    resp = preflight(server, "http://evil.example")
    check_error(resp, 400, "INVALID_ARGUMENT")
    assert "access-control-allow-origin" not in resp.headers
    resp = requests.get(url(server, "/v1/models"),
                        headers={"Origin": "http://evil.example", **AUTH}, timeout=30)
    assert resp.status_code == 200
    assert "access-control-allow-origin" not in resp.headers


# --- content type ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/sleep", "/wakeup", CHAT])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_post_body_not_json_is_415(server, path, content_type):
    headers = dict(AUTH) if content_type is None else {"Content-Type": content_type, **AUTH}
    resp = requests.post(url(server, path), data=json.dumps(chat()).encode(), headers=headers,
                         timeout=60)
    check_error(resp, 415, "INVALID_ARGUMENT")


def test_post_text_plain_without_body_is_415(server):
    resp = requests.post(url(server, "/sleep"), headers={"Content-Type": "text/plain", **AUTH},
                         timeout=60)
    check_error(resp, 415, "INVALID_ARGUMENT")


def test_json_content_type_parameters_are_accepted(server):
    resp = requests.post(url(server, CHAT), data=json.dumps(chat()).encode(), timeout=120,
                         headers={"Content-Type": "Application/JSON; charset=utf-8", **AUTH})
    assert resp.status_code == 200, resp.text


# --- body size ------------------------------------------------------------------------------


def test_content_length_over_limit_is_413_before_the_body(server):
    with connect(server) as sock:  # the body is never sent: the answer comes without it
        sock.sendall(head(server, CHAT, {**JSON_HEADERS, "Content-Length": str(MAX_BYTES + 1),
                                         "X-Request-Id": "big-1"}))
        status, headers, body = read_response(sock)
        raw_error(status, headers, body, 413, "INVALID_ARGUMENT")
        assert headers["connection"] == "close" and headers["x-request-id"] == "big-1"
        assert sock.recv(1) == b""  # closed


def test_chunked_body_over_limit_is_413_as_it_arrives(server):
    with connect(server) as sock:
        sock.sendall(head(server, CHAT, {**JSON_HEADERS, "Transfer-Encoding": "chunked"}))
        piece = b" " * 4096
        for _ in range(MAX_BYTES // len(piece) + 1):  # one piece past the limit, no last chunk
            sock.sendall(chunk(piece))
        status, headers, body = read_response(sock)
        raw_error(status, headers, body, 413, "INVALID_ARGUMENT")
        assert headers["connection"] == "close"


def test_chunked_body_under_limit_is_served(server):
    data = json.dumps(chat()).encode()
    with connect(server) as sock:
        sock.sendall(head(server, CHAT, {**JSON_HEADERS, "Transfer-Encoding": "chunked"}))
        for i in range(0, len(data), 16):
            sock.sendall(chunk(data[i:i + 16]))
        sock.sendall(b"0\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 200, body
    assert json.loads(body)["object"] == "chat.completion"


# --- body timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_slow_body_is_408(server, framing):
    data = json.dumps(chat()).encode()
    frame = {"Content-Length": str(len(data))} if framing == "length" else \
        {"Transfer-Encoding": "chunked"}
    with connect(server) as sock:
        start = time.monotonic()
        sock.sendall(head(server, CHAT, {**JSON_HEADERS, **frame}))
        sock.sendall(data[:10] if framing == "length" else chunk(data[:10]))
        status, headers, body = read_response(sock)  # the rest never comes
        elapsed = time.monotonic() - start
        error = raw_error(status, headers, body, 408, "DEADLINE_EXCEEDED")
        assert error["type"] == "invalid_request_error"
        assert BODY_TIMEOUT_S * 0.9 < elapsed < BODY_TIMEOUT_S + 10, elapsed
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""  # dropped


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_request_longer_than_body_timeout_is_not_cut(server, stream, monkeypatch):
    wait_idle(server)
    engine = server.engine.engine
    step = engine.step

    def slow_step():  # 120 steps then outlast 2 body timeouts on any host
        time.sleep(STEP_DELAY_S)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    body = chat(max_tokens=120, ignore_eos=True, stream=stream)
    start = time.monotonic()
    resp = requests.post(url(server, CHAT), json=body, headers=AUTH, timeout=300, stream=stream)
    assert resp.status_code == 200, resp.text
    if stream:
        lines = [line for line in resp.iter_lines(decode_unicode=True) if line]
        assert lines[-1] == "data: [DONE]"
        finish = [c["finish_reason"] for line in lines[:-1]
                  for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
        assert finish == ["length"], lines[-3:]
    else:
        assert resp.json()["usage"]["completion_tokens"] == 120
    elapsed = time.monotonic() - start
    assert elapsed > 2 * BODY_TIMEOUT_S, f"too quick ({elapsed:.2f} s) to test anything"


# --- X-Request-Id ---------------------------------------------------------------------------


def test_request_id_is_echoed(server):
    given = "client-id_1.2:3/" + "x" * 112  # 128 printable characters
    resp = requests.get(url(server, "/v1/models"), headers={"X-Request-Id": given, **AUTH},
                        timeout=30)
    assert resp.status_code == 200 and resp.headers["x-request-id"] == given
    for path, headers, status in (("/v1/models", {}, 401), ("/nowhere", AUTH, 404),
                                  ("/health", {"Host": "evil.example"}, 400)):
        resp = requests.get(url(server, path), headers={"X-Request-Id": "err-7", **headers},
                            timeout=30)
        assert resp.status_code == status and resp.headers["x-request-id"] == "err-7"
    resp = requests.post(url(server, "/sleep"), data=b"x", headers={"X-Request-Id": "err-8",
                         "Content-Type": "text/plain", **AUTH}, timeout=30)
    assert resp.status_code == 415 and resp.headers["x-request-id"] == "err-8"


@pytest.mark.parametrize("given", [None, "x" * 129, "has space", "tab\there", "caf\u00e9", ""])
def test_request_id_is_made_up_when_absent_or_unusable(server, given):
    headers = dict(AUTH) if given is None else {"X-Request-Id": given, **AUTH}
    first = requests.get(url(server, "/v1/models"), headers=headers, timeout=30)
    second = requests.get(url(server, "/health"), headers=headers, timeout=30)
    assert GENERATED_ID.fullmatch(first.headers["x-request-id"]), first.headers
    assert GENERATED_ID.fullmatch(second.headers["x-request-id"]), second.headers
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_generating_answer_has_a_request_id(server):
    for stream in (False, True):
        resp = requests.post(url(server, CHAT), json=chat(stream=stream), timeout=120,
                             headers={"X-Request-Id": "gen-1", **AUTH})
        assert resp.status_code == 200 and resp.headers["x-request-id"], resp.headers


# --- other error answers --------------------------------------------------------------------


def test_method_not_allowed_is_unimplemented(server):
    resp = requests.get(url(server, CHAT), headers=AUTH, timeout=30)
    error = check_error(resp, 405, "UNIMPLEMENTED")
    assert error["type"] == "invalid_request_error"
    assert "POST" in resp.headers["allow"]


def test_deeply_nested_json_is_400(server):
    nested = b"[" * 30000 + b"]" * 30000  # past the recursion limit of any JSON parser
    for path, raw in (("/sleep", nested), ("/sleep", b'{"level": ' + nested + b"}"),
                      (CHAT, nested)):
        resp = requests.post(url(server, path), data=raw, headers=JSON_HEADERS, timeout=60)
        check_error(resp, 400, "INVALID_ARGUMENT")
        assert "Traceback" not in resp.text
    assert requests_total(server, "/sleep", 500) == 0


@pytest.mark.parametrize("level", [1.0, 2.0, True, "1", None, [1]])
def test_sleep_level_must_be_the_integer_1_or_2(server, level):
    resp = requests.post(url(server, "/sleep"), json={"level": level}, headers=AUTH, timeout=60)
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    assert error["param"] == "level"
    assert not server.engine.is_sleeping


def test_sleep_and_wakeup_with_key_and_without_body(server):
    wait_idle(server)
    resp = requests.post(url(server, "/sleep"), headers=AUTH, timeout=120)  # Content-Length: 0
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "sleeping", "level": 1}
    with connect(server) as sock:  # as `curl -X POST`: neither Content-Length nor -Type
        sock.sendall(head(server, "/wakeup", AUTH))
        status, _, body = read_response(sock)
    assert status == 200, body
    assert json.loads(body) == {"status": "awake"}
    resp = requests.post(url(server, "/sleep"), json={"level": 2}, headers=AUTH, timeout=120)
    assert resp.json() == {"status": "sleeping", "level": 2}
    assert requests.post(url(server, "/wakeup"), headers=AUTH, timeout=120).status_code == 200
    assert not server.engine.is_sleeping


def test_client_gone_mid_upload_is_499_not_500(server, server_logs):
    before = {status: requests_total(server, CHAT, status) for status in (499, 500)}
    seen = len(server_logs.records)
    data = json.dumps(chat()).encode()
    with connect(server) as sock:
        sock.sendall(head(server, CHAT, {**JSON_HEADERS, "Content-Length": str(len(data))}))
        sock.sendall(data[:10])
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while requests_total(server, CHAT, 499) == before[499]:
        assert time.monotonic() < deadline, "the disconnect was not counted as 499"
        time.sleep(0.1)
    assert requests_total(server, CHAT, 499) == before[499] + 1
    assert requests_total(server, CHAT, 500) == before[500]
    for record in server_logs.records[seen:]:
        assert record.levelno < logging.WARNING and record.exc_info is None, record.getMessage()


# --- logs -----------------------------------------------------------------------------------


def test_open_server_warning(caplog):
    from fastapi import FastAPI

    from xllm.api.guards import add_guards
    from xllm.config import ServerConfig

    with caplog.at_level(logging.WARNING, logger="xllm.api"):
        add_guards(FastAPI(), ServerConfig(MODEL), vision=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no API key" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="xllm"):
        add_guards(FastAPI(), ServerConfig(MODEL, api_key=KEY), vision=False)
    assert not caplog.records


def test_key_is_never_logged(server, server_logs):
    assert server_logs.records, "nothing was logged at all"
    for record in server_logs.records:
        assert KEY not in record.getMessage()
