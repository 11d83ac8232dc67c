"""Debian's nginx as a real L7 load balancer on loopback, in front of quantserve replicas.

The configuration is the one docker/k8s/README.md recommends for a proxy that balances requests
(not connections) over quantserve replicas:
- proxy_buffering off, so SSE tokens reach the client as they are generated;
- upstream keep-alive (HTTP/1.1, Connection cleared), as production proxies run it;
- `proxy_next_upstream error timeout http_503 http_429 non_idempotent`: a request a replica
  refused (503 while draining, 429 when its queue is full) or could not take (connection refused
  once it has exited, a keep-alive connection it closed) is retried once on another replica. POST
  needs `non_idempotent`, and it is safe here: quantserve refuses before doing any work, keeps no
  state between requests, and a completion has no side effect beyond its own response. nginx never
  retries once the response has started, so a stream is never replayed halfway.
- each response carries the upstream(s) tried and their statuses, for the test to read.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def nginx_binary() -> str:
    """nginx's path; fails (root: `make test` installs it) or skips (not root: it cannot be)."""
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                         if os.access(p, os.X_OK)), None)
    if exe:
        return exe
    if os.geteuid() == 0:
        pytest.fail("nginx is missing: `make test-tools` installs Debian's nginx "
                    "(apt-get install nginx) before the tests")
    pytest.skip("nginx is missing and cannot be installed without root (apt-get install nginx)")


def config(port: int, upstreams: list[int], tmp: Path) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;"
                        for p in upstreams)
    user = "user root;" if os.geteuid() == 0 else ""  # workers need the (private) temp dir
    temp = "\n".join(f"    {kind}_temp_path {tmp / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""
{user}
worker_processes 1;
pid {tmp / 'nginx.pid'};
error_log {tmp / 'error.log'} warn;
events {{ worker_connections 512; }}
http {{
    log_format upstreams '$request $status upstream=$upstream_addr statuses=$upstream_status';
    access_log {tmp / 'access.log'} upstreams;
{temp}
    upstream quantserve {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://quantserve;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout http_503 http_429 non_idempotent;
            proxy_next_upstream_tries 2;
            proxy_next_upstream_timeout 30s;
            add_header X-Upstream $upstream_addr always;
            add_header X-Upstream-Status $upstream_status always;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    url: str
    proc: subprocess.Popen
    tmp: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown of master and worker
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        parts = [(self.tmp / n).read_text() for n in ("error.log", "access.log")
                 if (self.tmp / n).exists()]
        return "\n".join(parts)


def start_nginx(port: int, upstreams: list[int], tmp: Path) -> Nginx:
    """nginx in the foreground (`daemon off`), under the caller's control; waits until it listens."""
    exe = nginx_binary()
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(config(port, upstreams, tmp))
    test = subprocess.run([exe, "-t", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)
    assert test.returncode == 0, f"nginx rejected its configuration: {test.stderr}"
    proc = subprocess.Popen([exe, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}: {proc.stderr.read().decode()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return Nginx(f"http://127.0.0.1:{port}", proc, tmp)
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not start listening within 15 s")
