"""Server fixtures for the API tests: the real `xllm serve` process and an in-process server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

# Triton runs on the CPU only as an interpreter, and reads this before its first import
# (transformers imports it), so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SERVED_MODEL_NAME = "Qwen2-7B-Instruct"
# Above 2048 so that the seed's Python example (max_tokens 2048) fits as written.
SERVER_MAX_MODEL_LEN = 4096
SERVER_NUM_BLOCKS = 512  # 512 blocks of 16 tokens: 8192 KV slots
STARTUP_TIMEOUT_S = 600.0  # the first start converts the GGUF tokenizer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, timeout: float, alive=lambda: True) -> None:
    """Poll GET /health until it answers 200; raise if `alive()` turns false or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("server exited before it became healthy")
        try:
            if requests.get(f"{base_url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server at {base_url} not healthy after {timeout:.0f} s")


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "xllm"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "xllm.cli", "serve"]


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@contextlib.contextmanager
def running_server(args: list[str], log_path: Path, port: int | None = None) -> Iterator[str]:
    """Start `xllm serve` with `args` on `port` (default: a free one), yield its base URL
    once healthy, stop it by its PID."""
    port = port or free_port()
    cmd = serve_command() + ["--host", "127.0.0.1", "--port", str(port), *args]
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env())
    try:
        try:
            wait_healthy(base_url, STARTUP_TIMEOUT_S, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"{exc}; command {' '.join(cmd)}; log tail:\n{tail}")
        yield base_url
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real server on the default model."""
    args = [
        "--served-model-name", SERVED_MODEL_NAME,
        "--max-model-len", str(SERVER_MAX_MODEL_LEN),
        "--num-blocks", str(SERVER_NUM_BLOCKS),
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(args, log_path) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def serve_model():
    """`running_server`, for tests that serve a model of their own."""
    return running_server


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def openai_client(server_url: str):
    import openai

    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="EMPTY", timeout=300, max_retries=0)


@dataclass
class InProcessServer:
    """An HTTP server running in this process, with its engine open to inspection."""

    base_url: str
    engine: object  # xllm.engine.async_engine.AsyncEngine
    max_concurrent_requests: int


INPROC_MAX_MODEL_LEN = 2048
INPROC_NUM_BLOCKS = 256


@contextlib.contextmanager
def running_inproc_server(max_concurrent_requests: int, **server_fields
                          ) -> Iterator[InProcessServer]:
    """Engine + app built in this process (uvicorn in a thread) on the default model;
    `server_fields` are further ServerConfig fields (api_key, max_request_bytes, ...)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import uvicorn

    from xllm.api.server import build_app
    from xllm.config import EngineConfig, ServerConfig
    from xllm.engine.async_engine import AsyncEngine

    config = EngineConfig(
        model="default",
        max_model_len=INPROC_MAX_MODEL_LEN,
        num_blocks=INPROC_NUM_BLOCKS,
    )
    engine = AsyncEngine(config)
    engine.start()
    app = build_app(engine, ServerConfig(SERVED_MODEL_NAME,
                                         max_concurrent_requests=max_concurrent_requests,
                                         **server_fields))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="inproc-uvicorn", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, 120.0, alive=thread.is_alive)
        yield InProcessServer(base_url, engine, max_concurrent_requests)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()


@pytest.fixture(scope="session")
def start_inproc_server():
    """`running_inproc_server`, for tests that need an in-process server of their own."""
    return running_inproc_server


@pytest.fixture(scope="session")
def inproc_server() -> Iterator[InProcessServer]:
    """The in-process server, limited to one request at once."""
    with running_inproc_server(max_concurrent_requests=1) as server:
        yield server
