"""A draining replica answers new requests 503 and closes the connection, so a keep-alive client
(or a connection an L4 balancer such as kube-proxy pinned to this pod) retries on a fresh
connection, which the Service routes to a replica that is still serving."""

from __future__ import annotations

import json
import socket

import pytest

from tests.live_server import start_server


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = start_server(str(tiny_checkpoint))
    yield srv
    srv.stop()


def raw_exchange(url: str, request: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Send one HTTP/1.1 request on a fresh keep-alive socket; return what came back and whether the
    server closed the connection afterwards."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return data, False
            if not chunk:
                return data, True
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if sep and length and len(body) >= length[0]:
                s.settimeout(2)  # the whole response is here: does the server hang up?


def post(path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nConnection: keep-alive\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


def test_draining_503_closes_the_connection(server):
    request = post("/v1/completions", {"prompt": "hello", "max_tokens": 2})
    data, closed = raw_exchange(server.url, request)
    assert data.startswith(b"HTTP/1.1 200") and not closed  # serving: keep-alive kept
    server.state.draining = True
    try:
        data, closed = raw_exchange(server.url, request)
    finally:
        server.state.draining = False
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "server_draining"
    assert closed, "the draining server kept the keep-alive connection open"
