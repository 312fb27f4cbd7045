"""Image URLs to bytes: data:, http(s):// against a local server of the test's own, file://."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from xllm.api.errors import APIError
from xllm.api.media import MediaConfig, load_image_bytes


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


PNG = png_bytes()
SMALL = 1000  # max_bytes of the size tests


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    paths: list[str] = []  # every path asked for, in order

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        Handler.paths.append(self.path)
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        try:
            name = parts.path.strip("/").replace("-", "_").replace(".", "_")
            route = getattr(self, "route_" + name, None)
            if route is None:
                self.send(404, b"not found")
            else:
                route(query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up: what the size and time limits do

    def route_good_png(self, query) -> None:
        self.send(200, PNG, {"Content-Type": "image/png"})

    def route_big(self, query) -> None:  # says its size up front
        self.send(200, b"x" * (SMALL + 1))

    def route_no_length(self, query) -> None:  # HTTP/1.0 style: the body ends at close
        self.close_connection = True
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"x" * (SMALL * 5))

    def route_chunked(self, query) -> None:  # an endless chunked body
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.wfile.write(b"100\r\n" + b"x" * 256 + b"\r\n")
            self.wfile.flush()
            time.sleep(0.001)

    def route_slow(self, query) -> None:
        time.sleep(2)
        self.send(200, PNG)

    def route_trickle(self, query) -> None:  # fast headers, a body one byte at a time
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.05)

    def route_redirect(self, query) -> None:
        self.send(302, b"", {"Location": query["to"][0]})

    def route_loop(self, query) -> None:
        self.send(302, b"", {"Location": "/loop"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # slow handlers finish on their own


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def load(url: str, config: MediaConfig | None = None, name: str = "image 2") -> bytes:
    return asyncio.run(load_image_bytes(url, config or MediaConfig(), name))


def refusal(url: str, config: MediaConfig | None = None, name: str = "image 2") -> str:
    with pytest.raises(APIError) as info:
        load(url, config, name)
    err = info.value
    assert (err.status, err.param) == (400, "messages")
    assert err.body()["error"]["code"] == "INVALID_ARGUMENT"
    assert err.message.startswith(f"{name}: ")
    return err.message


# --- http(s)


def test_http_good(base_url: str) -> None:
    assert load(f"{base_url}/good.png") == PNG
    assert load(f"{base_url}/redirect?to=/good.png") == PNG
    assert load(f"{base_url.upper()}/good.png") == PNG


def test_http_404(base_url: str) -> None:
    message = refusal(f"{base_url}/missing.png")
    assert "status 404" in message and f"{base_url}/missing.png" in message


def test_http_long_url_is_cut(base_url: str) -> None:
    message = refusal(f"{base_url}/missing.png?q=" + "a" * 1000)
    assert "status 404" in message and "..." in message
    assert len(message) < 300


def test_http_too_large_with_length(base_url: str) -> None:
    config = MediaConfig(max_bytes=SMALL)
    assert f"larger than {SMALL} bytes" in refusal(f"{base_url}/big", config)
    assert load(f"{base_url}/big", MediaConfig(max_bytes=SMALL + 1)) == b"x" * (SMALL + 1)


def test_http_too_large_without_length(base_url: str) -> None:
    config = MediaConfig(max_bytes=SMALL)
    assert f"larger than {SMALL} bytes" in refusal(f"{base_url}/no-length", config)


def test_http_too_large_chunked_cut_off_early(base_url: str) -> None:
    config = MediaConfig(max_bytes=SMALL, fetch_timeout=5.0)
    start = time.monotonic()
    assert f"larger than {SMALL} bytes" in refusal(f"{base_url}/chunked", config)
    assert time.monotonic() - start < 2.0  # not read to the end (it has none)


def test_http_timeout(base_url: str) -> None:
    config = MediaConfig(fetch_timeout=0.5)
    for path in ("/slow", "/trickle"):  # the whole fetch is bounded, not each read
        start = time.monotonic()
        message = refusal(f"{base_url}{path}", config)
        assert "timed out after 0.5 s" in message and path in message
        assert time.monotonic() - start < 1.5


def test_http_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    message = refusal(f"http://127.0.0.1:{port}/x.png", MediaConfig(fetch_timeout=5.0))
    assert "could not connect" in message and f"127.0.0.1:{port}" in message
    assert message.endswith("(connection refused)")


def test_allowed_domains(base_url: str) -> None:
    Handler.paths.clear()
    message = refusal(f"{base_url}/good.png", MediaConfig(allowed_domains=("example.com",)))
    assert "'127.0.0.1' is not among the allowed media domains" in message
    assert Handler.paths == []  # refused before connecting
    assert load(f"{base_url}/good.png", MediaConfig(allowed_domains=("127.0.0.1",))) == PNG
    port = urlsplit(base_url).port
    Handler.paths.clear()
    for trick in (f"http://example.com\\@127.0.0.1:{port}/good.png",
                  f"http://example.com:80@127.0.0.1:{port}/good.png"):
        assert "'127.0.0.1' is not among" in refusal(
            trick, MediaConfig(allowed_domains=("example.com",)))
    assert Handler.paths == []
    config = MediaConfig(allowed_domains=("LocalHost",))
    assert load(f"http://LOCALHOST:{port}/good.png", config) == PNG


def test_redirect_to_disallowed_host(base_url: str) -> None:
    config = MediaConfig(allowed_domains=("127.0.0.1",))
    Handler.paths.clear()
    message = refusal(f"{base_url}/redirect?to=http://evil.example/x.png", config)
    assert "redirected to http://evil.example/x.png" in message
    assert "'evil.example' is not among the allowed media domains" in message
    port = urlsplit(base_url).port
    message = refusal(f"{base_url}/redirect?to=http://localhost:{port}/good.png", config)
    assert "'localhost' is not among" in message
    assert all("good.png" not in path.split("?")[0] for path in Handler.paths)


def test_redirect_to_other_schemes_and_loops(base_url: str) -> None:
    assert "unsupported URL scheme 'file'" in refusal(
        f"{base_url}/redirect?to=file:///etc/passwd")
    assert "unsupported URL scheme 'data'" in refusal(
        f"{base_url}/redirect?to=data:image/png;base64,AAAA")
    assert "more than 5 redirects" in refusal(f"{base_url}/loop")
    assert "not a valid URL" in refusal(f"{base_url}/redirect?to=http://[::1/x")


# --- data:


def data_url(payload: bytes, header: str = "image/png;base64") -> str:
    return f"data:{header}," + base64.b64encode(payload).decode()


def test_data_url_good() -> None:
    assert load(data_url(PNG)) == PNG
    assert load(data_url(PNG, "IMAGE/PNG;BASE64").replace("data:", "DATA:")) == PNG
    assert load(data_url(PNG, "image/webp;name=x.webp;base64")) == PNG
    text = base64.b64encode(PNG).decode()
    wrapped = "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert load("data:image/png;base64," + wrapped + "\n") == PNG  # MIME line breaks


def test_data_url_bad_base64_not_quoted() -> None:
    secret = base64.b64encode(b"user's private pixels" * 20).decode()
    for payload in (secret + "!", secret[:-1], secret.replace("+", "-") + "-_", "é"):
        message = refusal("data:image/png;base64," + payload)
        assert message == "image 2: the data: URL is not valid base64"


def test_data_url_refusals() -> None:
    assert "is not an image type" in refusal(data_url(PNG, "text/plain;base64"))
    assert "is not an image type" in refusal(data_url(PNG, ";base64"))
    assert "not marked ';base64'" in refusal("data:image/png,rawbytes")
    assert "not marked ';base64'" in refusal("data:image/png;charset=utf-8,abc")
    assert "no ','" in refusal("data:image/png;base64")
    config = MediaConfig(max_bytes=SMALL)
    assert load(data_url(b"x" * SMALL), config) == b"x" * SMALL
    assert f"larger than {SMALL} bytes" in refusal(data_url(b"x" * (SMALL + 1)), config)
    assert f"larger than {SMALL} bytes" in refusal(data_url(b"x" * 100 * SMALL), config)


# --- file://


@pytest.fixture
def files(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "img.png").write_bytes(PNG)
    (allowed / "my image.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"secret")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    (allowed / "alias.png").symlink_to(allowed / "img.png")
    (allowed / "up").symlink_to(tmp_path)
    (allowed / "big.png").write_bytes(b"x" * (SMALL + 1))
    (allowed / "dir").mkdir()
    return allowed


def test_file_inside(files: Path) -> None:
    config = MediaConfig(allowed_local_path=files)
    assert load(f"file://{files}/img.png", config) == PNG
    assert load(f"file://localhost{files}/img.png", config) == PNG
    assert load(f"file://{files}/my%20image.png", config) == PNG
    assert load(f"file://{files}/alias.png", config) == PNG  # a link that stays inside
    assert load(f"file://{files}/dir/../img.png", config) == PNG


def test_file_outside(files: Path) -> None:
    config = MediaConfig(allowed_local_path=files)
    for url in (f"file://{files.parent}/secret.png", f"file://{files}/../secret.png",
                f"file://{files}/link.png", f"file://{files}/up/secret.png",
                f"file://{files}/%2e%2e/secret.png", f"file://{files.parent}/nothing.png",
                "file:///etc/passwd"):
        message = refusal(url, config)
        assert message == "image 2: the file:// path is outside the allowed directory"


def test_file_refusals(files: Path) -> None:
    assert "not allowed on this server" in refusal(f"file://{files}/img.png")
    config = MediaConfig(allowed_local_path=files, max_bytes=SMALL)
    assert "does not exist" in refusal(f"file://{files}/nothing.png", config)
    assert "not a regular file" in refusal(f"file://{files}/dir", config)
    assert f"larger than {SMALL} bytes" in refusal(f"file://{files}/big.png", config)
    assert "local path" in refusal(f"file://example.com{files}/img.png", config)
    assert "absolute path" in refusal("file:img.png", config)
    assert "not valid" in refusal(f"file://{files}/a%00b.png", config)


def test_file_fifo_does_not_block(files: Path) -> None:
    os.mkfifo(files / "fifo")
    config = MediaConfig(allowed_local_path=files)
    assert "not a regular file" in refusal(f"file://{files}/fifo", config)


# --- other schemes


@pytest.mark.parametrize(("url", "said"), [
    ("ftp://example.com/x.png", "unsupported URL scheme 'ftp'"),
    ("gopher://example.com/x", "unsupported URL scheme 'gopher'"),
    ("javascript:alert(1)", "unsupported URL scheme 'javascript'"),
    ("/etc/passwd", "unsupported URL without a scheme"),
    ("img.png", "unsupported URL without a scheme"),
    ("", "the image URL is empty"),
])
def test_unsupported_schemes(url: str, said: str) -> None:
    assert said in refusal(url)
