"""The bytes of an image URL in a request: data:, http(s):// or (when allowed) file://.

Every refusal is a 400 naming the image ("image 2: ..."); a data: URL's payload is never
quoted. A data: payload may carry ASCII whitespace (line breaks of MIME base64), which is
dropped; any other character outside the standard base64 alphabet is refused. Whether the
bytes are an image at all is for the decoder (xllm.engine.images) to say.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from xllm.api.errors import APIError, invalid, quoted

MAX_REDIRECTS = 5
URL_QUOTE_LIMIT = 200  # characters of an http(s) URL an error message may name
_REDIRECTS = (301, 302, 303, 307, 308)
_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")


@dataclass(frozen=True)
class MediaConfig:
    """Where images may come from, and how much of them the server takes."""

    allowed_domains: tuple[str, ...] = ()  # empty: any host; else exact host names
    allowed_local_path: Path | None = None  # file:// only under it; None: file:// refused
    fetch_timeout: float = 10.0  # seconds for a whole http(s) fetch, redirects included
    max_bytes: int = 20 << 20  # largest image accepted (data: decoded, http body, file)


def _refuse(name: str, message: str) -> APIError:
    return invalid(f"{name}: {message}", "messages")


async def load_image_bytes(url: str, config: MediaConfig, name: str = "image") -> bytes:
    """The bytes behind `url`, or a 400 saying why not."""
    if not url:
        raise _refuse(name, "the image URL is empty")
    scheme, sep, _ = url.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme == "data":
        return data_url_bytes(url, config, name)
    if scheme in ("http", "https"):
        return await fetch_http(url, config, name)
    if scheme == "file":
        return await read_file_url(url, config, name)
    what = f"URL scheme {quoted(scheme)}" if scheme else "URL without a scheme"
    raise _refuse(name, f"unsupported {what}; use data:image/...;base64,..., http(s)://"
                  + (" or file://" if config.allowed_local_path is not None else ""))


def data_url_bytes(url: str, config: MediaConfig, name: str = "image") -> bytes:
    """The payload of `data:image/<type>[;param...];base64,<payload>`."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise _refuse(name, "the data: URL has no ',' before its data")
    media_type, *params = header.split(";")
    if not media_type.strip().lower().startswith("image/"):
        raise _refuse(name, f"the data: URL's media type {quoted(media_type.strip())} "
                      "is not an image type")
    if not params or params[-1].strip().lower() != "base64":
        raise _refuse(name, "the data: URL is not marked ';base64'")
    payload = payload.translate(_WHITESPACE)
    if len(payload) // 4 * 3 > config.max_bytes + 2:
        raise _refuse(name, f"the image is larger than {config.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(name, "the data: URL is not valid base64") from None
    if len(data) > config.max_bytes:
        raise _refuse(name, f"the image is larger than {config.max_bytes} bytes")
    return data


def _host_allowed(url: httpx.URL, config: MediaConfig) -> bool:
    """Exact host names, case-insensitive; an IDN matches in Unicode or in punycode."""
    if not config.allowed_domains:
        return True
    hosts = {url.host, url.raw_host.decode("ascii", "replace")}
    allowed = {domain.rstrip(".").lower() for domain in config.allowed_domains}
    return any(host.rstrip(".").lower() in allowed for host in hosts)


def _check_http_url(url: str | httpx.URL, config: MediaConfig, name: str,
                    what: str) -> httpx.URL:
    """`url` parsed by httpx (the parser that will fetch it, so the host checked is the host
    reached); refused unless http(s) to an allowed host. `what` names it in messages."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise _refuse(name, f"{what}: not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise _refuse(name, f"{what}: unsupported URL scheme {quoted(parsed.scheme)}")
    if not parsed.host:
        raise _refuse(name, f"{what}: the URL has no host")
    if not _host_allowed(parsed, config):
        raise _refuse(name, f"{what}: the host {quoted(parsed.host)} is not among the allowed "
                      "media domains")
    return parsed


def _shown(url: str) -> str:
    return url if len(url) <= URL_QUOTE_LIMIT else url[: URL_QUOTE_LIMIT - 3] + "..."


async def fetch_http(url: str, config: MediaConfig, name: str = "image") -> bytes:
    """GET `url` (redirects followed, each target checked) within the size and time limits."""
    shown = _shown(url)
    parsed = _check_http_url(url, config, name, shown)
    try:
        return await asyncio.wait_for(_get(parsed, config, name, shown), config.fetch_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise _refuse(name, f"fetching {shown} timed out after {config.fetch_timeout:g} s"
                      ) from None
    except httpx.ConnectError as exc:
        raise _refuse(name, f"could not connect to fetch {shown} ({_reason(exc)})") from None
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError) as exc:
        raise _refuse(name, f"fetching {shown} failed: {type(exc).__name__}"
                      + (f" ({exc})" if str(exc) else "")) from None


def _reason(exc: BaseException) -> str:
    """The OS's words for the first system error under `exc` (e.g. "connection refused")."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno:
            text = os.strerror(cause.errno) if cause.errno > 0 else cause.strerror
            return (text or str(cause)).lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


class _Redirect(Exception):
    """A redirect, raised from a response hook before httpx reads its Location (httpx would
    refuse some targets, e.g. data:, with a message of its own)."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


async def _stop_at_redirect(response: httpx.Response) -> None:
    location = response.headers.get("location")
    if response.status_code in _REDIRECTS and location:
        raise _Redirect(location)


async def _get(url: httpx.URL, config: MediaConfig, name: str, shown: str) -> bytes:
    """Follow redirects by hand: the URL fetched is always the URL checked."""
    timeout = httpx.Timeout(config.fetch_timeout)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False,
                                 event_hooks={"response": [_stop_at_redirect]}) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with client.stream("GET", url) as response:
                    if not 200 <= response.status_code < 300:
                        raise _refuse(name, f"fetching {shown} failed: the server answered "
                                      f"status {response.status_code}")
                    return await _read_body(response, config, name, shown)
            except _Redirect as redirect:
                what = f"{shown} redirected to {_shown(redirect.location)}"
                try:
                    target = url.join(redirect.location)
                except (httpx.InvalidURL, ValueError, TypeError):
                    raise _refuse(name, f"{what}: not a valid URL") from None
                url = _check_http_url(target, config, name, what)
    raise _refuse(name, f"fetching {shown} failed: more than {MAX_REDIRECTS} redirects")


async def _read_body(response: httpx.Response, config: MediaConfig, name: str,
                     shown: str) -> bytes:
    def too_large() -> APIError:
        return _refuse(name, f"{shown} is larger than {config.max_bytes} bytes")

    length = response.headers.get("content-length", "").strip()
    if length.isdigit() and int(length) > config.max_bytes:
        raise too_large()  # said so up front: not a byte read
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > config.max_bytes:
            raise too_large()  # cut off as soon as it is over
    return bytes(body)


async def read_file_url(url: str, config: MediaConfig, name: str = "image") -> bytes:
    """The bytes of a file:// URL under `config.allowed_local_path` (symlinks resolved)."""
    if config.allowed_local_path is None:
        raise _refuse(name, "file:// URLs are not allowed on this server")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _refuse(name, "a file:// URL must name a local path (file:///...)")
    raw = unquote(parts.path)
    if not raw.startswith("/"):
        raise _refuse(name, "a file:// URL must name an absolute path")
    try:
        root = Path(config.allowed_local_path).resolve()
        path = Path(raw).resolve()  # `..` and every symlink followed
    except (OSError, ValueError, RuntimeError):  # NUL byte, symlink loop
        raise _refuse(name, "the file:// path is not valid") from None
    if not path.is_relative_to(root):
        raise _refuse(name, "the file:// path is outside the allowed directory")
    return await asyncio.to_thread(_read_file, path, config.max_bytes, name)


def _read_file(path: Path, max_bytes: int, name: str) -> bytes:
    """Read a resolved path: no symlink at the end, no wait on a FIFO, at most max_bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _refuse(name, "the file:// path does not exist") from None
    except OSError as exc:
        raise _refuse(name, f"the file could not be opened ({exc.strerror or 'error'})"
                      ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(name, "the file:// path is not a regular file")
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(max_bytes + 1)
        except OSError as exc:
            raise _refuse(name, f"the file could not be read ({exc.strerror or 'error'})"
                          ) from None
    if len(data) > max_bytes:
        raise _refuse(name, f"the file is larger than {max_bytes} bytes")
    return data
