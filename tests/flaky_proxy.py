"""A small fault-injecting HTTP proxy for tests: put it in front of the local S3 endpoint.

It forwards every request to ``upstream`` and answers a chosen share of them with an S3-style 500/503
instead. It binds to 127.0.0.1 only, serves from daemon threads, and stops by itself after ``lifetime_s``
seconds or ``max_requests`` requests, whichever comes first, so a hung test cannot leave it running.

    with FlakyProxy(upstream, fail_rate=0.3) as proxy:
        ...  # point AWS_ENDPOINT_URL at proxy.url
        proxy.failed, proxy.forwarded  # what happened

``max_consecutive`` caps how often the *same* request (method + path + query) fails in a row, so a client
with at least that many retries always gets through: the transient case is deterministic, not a gamble.
``fail_rate=1.0`` with ``max_consecutive=None`` is a permanent outage. ``only`` restricts faults to requests
whose path contains that text (e.g. a bucket or an output folder).
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


class FlakyProxy:
    def __init__(self, upstream: str, *, fail_rate: float = 0.3, statuses: tuple[int, ...] = (500, 503),
                 max_consecutive: Optional[int] = 2, only: Optional[str] = None, seed: int = 0,
                 lifetime_s: float = 600.0, max_requests: int = 20_000):
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"FlakyProxy only forwards to a local endpoint, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.fail_rate = fail_rate
        self.statuses = statuses
        self.max_consecutive = max_consecutive
        self.only = only
        self.lifetime_s = lifetime_s
        self.max_requests = max_requests
        self.forwarded = 0
        self.failed = 0
        self._rng = random.Random(seed)
        self._streak: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FlakyProxy":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        threading.Thread(target=self._server.shutdown, daemon=True).start()  # safe from a handler thread
        self._server.server_close()

    def __enter__(self) -> "FlakyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._thread.join(timeout=5)

    # -- decisions ------------------------------------------------------------------------------------
    def _should_fail(self, key: str, path: str) -> Optional[int]:
        with self._lock:
            if self.forwarded + self.failed >= self.max_requests:
                threading.Thread(target=self.stop, daemon=True).start()
            if self.only is not None and self.only not in path:
                self._streak[key] = 0
                return None
            capped = self.max_consecutive is not None and self._streak[key] >= self.max_consecutive
            if not capped and self._rng.random() < self.fail_rate:
                self._streak[key] += 1
                self.failed += 1
                return self._rng.choice(self.statuses)
            self._streak[key] = 0
            self.forwarded += 1
            return None

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                return None

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, head: bool) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if not head or not any(n.lower() == "content-length" for n, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                path = self.path
                head = self.command == "HEAD"
                status = proxy._should_fail(f"{self.command} {path}", path)
                if status is not None:
                    code, message = _ERRORS.get(status, ("InternalError", "injected failure"))
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                           f"<Message>{message}</Message><RequestId>flaky-proxy</RequestId></Error>").encode()
                    self._reply(status, [("Content-Type", "application/xml")], xml, head)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders()
                           if k.lower() not in _HOP_BY_HOP and (head or k.lower() != "content-length")]
                    self._reply(resp.status, out, data, head)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler

