"""Checks shared by the API tests: the OpenAI error shape and a server still healthy."""

import requests


def check_error(resp: requests.Response, status: int, code: str) -> dict:
    """Assert the status and OpenAI error shape; return the `error` object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert "Traceback" not in resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "code", "param"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == code
    return error


def assert_still_healthy(server_url: str) -> None:
    resp = requests.get(f"{server_url}/health", timeout=30)
    assert resp.status_code == 200
    assert resp.json() == {"status": "healthy"}
