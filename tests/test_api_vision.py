"""Image inputs through the real server (API.md section 6) on a small random Qwen2.5-VL:
the seed's two vision requests, data:, http:// and file:// URLs, answers equal to
transformers', image and text requests side by side, and every bad input a 400."""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from api_checks import assert_still_healthy, check_error
from vl_model import build_tiny_qwen2_5_vl, encoded, hf_vl_reference, random_image

MODEL = "Qwen2.5-VL-7B-Instruct"
SEED_PORT = 12345  # the seed's vision examples' port, used when it is free
CHAT = "/v1/chat/completions"
MAX_IMAGES = 3
MAX_IMAGE_PIXELS = 1000 * 1000
FETCH_TIMEOUT_S = 1.0
GREEDY_TOKENS = 12


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(urls: list[str], text: str = "Describe the picture.") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def chat(messages: list[dict], **fields) -> dict:
    return {"model": MODEL, "messages": messages, "temperature": 0,
            "max_completion_tokens": GREEDY_TOKENS, **fields}


class ImageFiles(http.server.SimpleHTTPRequestHandler):
    """Serves the test's image folder; /slow answers after the server's fetch timeout."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/slow":
            time.sleep(3 * FETCH_TIMEOUT_S)
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # /slow's client has gone by the time it answers


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Image files on disk and a local HTTP server for them."""
    folder = tmp_path_factory.mktemp("media")
    files = {"photo.jpg": encoded(random_image(120, 90, seed=1), "JPEG"),
             "tall.png": encoded(random_image(60, 200, seed=2)),
             "wide.webp": encoded(random_image(300, 70, seed=3), "WEBP")}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    handler = lambda *args: ImageFiles(*args, directory=str(folder))  # noqa: E731
    httpd = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield {"folder": folder, "files": files, "url": f"http://127.0.0.1:{httpd.server_port}"}
    httpd.shutdown()


@pytest.fixture(scope="module")
def vl_folder(tmp_path_factory) -> Path:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vl") / "tiny-qwen2.5-vl")


def seed_port_or_free() -> int | None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", SEED_PORT))
        except OSError:
            return None
    return SEED_PORT


@pytest.fixture(scope="module")
def vl_url(vl_folder, media, tmp_path_factory, serve_model) -> str:
    args = ["--model", str(vl_folder), "--served-model-name", MODEL,
            "--max-model-len", "4096", "--num-blocks", "512",
            "--limit-images-per-prompt", str(MAX_IMAGES),
            "--max-image-pixels", str(MAX_IMAGE_PIXELS),
            "--media-fetch-timeout", str(FETCH_TIMEOUT_S),
            "--allowed-local-media-path", str(media["folder"])]
    log = tmp_path_factory.mktemp("vl_server") / "server.log"
    with serve_model(args, log, seed_port_or_free()) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def hf(vl_folder):
    return hf_vl_reference(vl_folder)


def answer(base_url: str, urls: list[str], text: str = "Describe the picture.") -> dict:
    resp = requests.post(base_url + CHAT, json=chat(image_message(urls, text)), timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()


# --- the seed's requests ------------------------------------------------------------------


def test_seed_http_example_as_written(vl_url, media):
    """The seed's raw-HTTP vision example; only its URLs are filled in."""
    api_url = f"{vl_url}/v1/chat/completions"
    image_url = f"{media['url']}/photo.jpg"

    def encode_image(url: str) -> str:
        with requests.get(url) as response:
            response.raise_for_status()
            result = base64.b64encode(response.content).decode("utf-8")
        return result

    image_base64 = encode_image(image_url)
    payload = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "介绍下这张图片"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/jpeg;base64,{image_base64}"},
                    },
                ],
            }
        ],
        "model": "Qwen2.5-VL-7B-Instruct",
        "max_completion_tokens": 128,
    }
    response = requests.post(api_url, json=payload, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    body = response.json()
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert body["usage"]["completion_tokens"] >= 1
    # 120 x 90 pixels become a 10 x 8 patch grid (bounds of the test model): 20 image tokens
    assert body["usage"]["prompt_tokens"] > 20


def test_seed_openai_example_as_written(vl_url, media):
    """The seed's `openai` client vision example; only its URLs are filled in."""
    from openai import OpenAI

    openai_api_key = "EMPTY"
    openai_api_base = f"{vl_url}/v1"
    image_url = f"{media['url']}/photo.jpg"
    client = OpenAI(api_key=openai_api_key, base_url=openai_api_base)

    def encode_image(url: str) -> str:
        with requests.get(url) as response:
            response.raise_for_status()
            result = base64.b64encode(response.content).decode("utf-8")
        return result

    image_base64 = encode_image(image_url)
    chat_completion = client.chat.completions.create(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "介绍下这张图片"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/jpeg;base64,{image_base64}"},
                    },
                ],
            }
        ],
        model="Qwen2.5-VL-7B-Instruct",
        max_completion_tokens=128,
    )
    result = chat_completion.choices[0].message.content
    assert isinstance(result, str)
    assert chat_completion.choices[0].finish_reason in ("stop", "length")


# --- answers ------------------------------------------------------------------------------


def hf_answer(hf, text: str, images) -> str:
    messages = [{"role": "user", "content": [{"type": "text", "text": text},
                                             *({"type": "image"} for _ in images)]}]
    return hf_text(hf, messages, images)


def hf_text(hf, messages: list[dict], images) -> str:
    """Transformers' greedy answer, which must not be empty (the comparison would be weak)."""
    tokens, _ = hf.greedy(hf.processor_inputs(messages, images), GREEDY_TOKENS)
    text = hf.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(tokens) > 2 and text.strip()
    return text


def test_data_url_answer_equals_transformers(vl_url, hf):
    image = random_image(100, 140, seed=5)
    body = answer(vl_url, [data_url(encoded(image))])
    assert body["choices"][0]["message"]["content"] == hf_answer(
        hf, "Describe the picture.", [image])


def test_two_images_answer_equals_transformers(vl_url, hf):
    images = [random_image(100, 140, seed=6), random_image(200, 60, seed=7)]
    body = answer(vl_url, [data_url(encoded(image)) for image in images], "Compare them.")
    assert body["choices"][0]["message"]["content"] == hf_answer(hf, "Compare them.", images)


def test_images_in_several_turns_answer_equals_transformers(vl_url, hf):
    images = [random_image(90, 90, seed=30), random_image(150, 80, seed=31)]
    turns = [("user", "Here is one.", images[0]), ("assistant", "A picture.", None),
             ("user", "And another; compare.", images[1])]

    def content(text, image, url):
        if image is None:
            return text
        return [{"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url}} if url else {"type": "image"}]

    ours = [{"role": role, "content": content(text, image, image and data_url(encoded(image)))}
            for role, text, image in turns]
    theirs = [{"role": role, "content": content(text, image, None)}
              for role, text, image in turns]
    resp = requests.post(vl_url + CHAT, json=chat(ours), timeout=300)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == hf_text(hf, theirs, images)


def test_http_and_file_urls_give_the_data_url_answer(vl_url, media):
    data = media["files"]["tall.png"]
    by_data = answer(vl_url, [data_url(data)])
    by_http = answer(vl_url, [f"{media['url']}/tall.png"])
    by_file = answer(vl_url, [(media["folder"] / "tall.png").as_uri()])
    for body in (by_http, by_file):
        assert body["choices"][0]["message"] == by_data["choices"][0]["message"]
        assert body["usage"] == by_data["usage"]


def test_webp_and_jpeg_by_http(vl_url, media):
    body = answer(vl_url, [f"{media['url']}/wide.webp", f"{media['url']}/photo.jpg"])
    assert body["usage"]["prompt_tokens"] > 0


def test_image_and_text_requests_side_by_side(vl_url, media):
    """Image and text requests run concurrently; each answer equals the one it gets alone."""
    images = [data_url(encoded(random_image(80 + 20 * i, 60 + 30 * i, seed=20 + i)))
              for i in range(4)]
    texts = [f"Count to {i + 3}." for i in range(4)]
    jobs = [("image", [url]) for url in images] + [("text", text) for text in texts]

    def one(job):
        kind, value = job
        messages = image_message(value) if kind == "image" else [
            {"role": "user", "content": value}]
        resp = requests.post(vl_url + CHAT, json=chat(messages), timeout=300)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(one, jobs))
    alone = [one(job) for job in jobs]
    assert together == alone


def test_streamed_image_answer(vl_url):
    url = data_url(encoded(random_image(64, 64, seed=8)))
    body = chat(image_message([url]), stream=True)
    whole = answer(vl_url, [url])["choices"][0]["message"]["content"]
    with requests.post(vl_url + CHAT, json=body, stream=True, timeout=300) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole


# --- bad input ----------------------------------------------------------------------------


def refused(base_url: str, urls: list[str], words: list[str]) -> None:
    resp = requests.post(base_url + CHAT, json=chat(image_message(urls)), timeout=120)
    error = check_error(resp, 400, "INVALID_ARGUMENT")
    message = error["message"].lower()
    assert all(word.lower() in message for word in words), error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_images_are_refused(vl_url, media):
    good = data_url(media["files"]["tall.png"])
    big = encoded(random_image(1, 1).resize((1001, 1000)))
    cases = [
        (["data:image/png;base64,"], ["image 1", "empty"]),
        ([data_url(b"this is not an image")], ["image 1"]),
        (["data:image/png;base64,@@not base64@@"], ["image 1", "base64"]),
        ([good, "ftp://127.0.0.1/a.png"], ["image 2", "ftp"]),
        ([f"{media['url']}/missing.png"], ["missing.png", "404"]),
        ([f"http://127.0.0.1:{free_port()}/a.png"], ["127.0.0.1"]),
        ([f"{media['url']}/slow"], ["/slow"]),
        ([good] * (MAX_IMAGES + 1), ["too many images"]),
        ([data_url(big)], ["image 1", "1001"]),
        (["file:///etc/hostname"], ["file"]),
        ([data_url(b"abc", "text/plain")], ["image 1"]),
    ]
    for urls, words in cases:
        refused(vl_url, urls, words)
    assert_still_healthy(vl_url)


def test_placeholder_in_text_is_refused(vl_url, media):
    messages = image_message([data_url(media["files"]["tall.png"])],
                             "look: <|vision_start|><|image_pad|><|vision_end|>")
    resp = requests.post(vl_url + CHAT, json=chat(messages), timeout=120)
    assert "placeholder" in check_error(resp, 400, "INVALID_ARGUMENT")["message"]


def test_text_only_request_to_the_vision_model(vl_url):
    resp = requests.post(vl_url + CHAT, json=chat([{"role": "user", "content": "Hello"}]),
                         timeout=120)
    assert resp.status_code == 200, resp.text
