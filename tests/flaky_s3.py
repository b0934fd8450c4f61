"""A flaky S3 proxy on 127.0.0.1 for fault tests: it forwards to the local S3 server (moto) and
injects the faults real object stores show under load.

- ``slowdown``: the first N requests for each object key answer ``503 SlowDown`` (S3's XML error).
- ``reset``: the first request for each key whose name matches ``reset_match`` is dropped: the
  proxy closes the socket without answering (a connection reset to the client).
- ``truncate``: the first GET of each key matching ``truncate_match`` with a body of more than
  ``truncate_min_bytes`` answers 200 (or 206) with the full ``Content-Length`` but only half the body,
  then closes the connection (a response cut short mid-transfer).

Counts of what was injected (and of requests forwarded) are kept for the test's report. The proxy
is plain http on loopback, like moto; clients point ``s3.endpoint_url`` at :attr:`FlakyS3.url`.
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
# Hop-by-hop headers are the proxy's own business (RFC 9110 7.6.1).
# Expect: 100-continue is answered by this proxy itself (BaseHTTPRequestHandler does).
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "expect",
}


@dataclass
class Faults:
    slowdown: int = 0  # 503 SlowDown answers per key before the request goes through
    reset_match: str | None = None  # substring of the path: first request per key is dropped
    truncate_match: str | None = None  # substring of the path: first GET per key is cut short
    truncate_min_bytes: int = 64
    methods: tuple[str, ...] = ("GET", "PUT", "HEAD", "POST", "DELETE")


@dataclass
class FlakyS3:
    upstream: str
    faults: Faults = field(default_factory=Faults)
    injected: Counter = field(default_factory=Counter)
    seen: Counter = field(default_factory=Counter)  # per (kind, key): how often a fault hit it
    forwarded: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _take(self, kind: str, key: str, limit: int) -> bool:
        """True when fault ``kind`` is still due for ``key`` (and count it)."""
        with self._lock:
            if self.seen[(kind, key)] >= limit:
                return False
            self.seen[(kind, key)] += 1
            self.injected[kind] += 1
            return True

    def start(self) -> FlakyS3:
        proxy = self
        up = urlparse(self.upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
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

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )  # close with RST, not FIN
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._body()
                key = self.path.split("?", 1)[0]
                f = proxy.faults
                if self.command in f.methods:
                    if f.slowdown and proxy._take("slowdown", f"{self.command} {key}", f.slowdown):
                        self.send_response(503)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                        self.end_headers()
                        if self.command != "HEAD":  # a HEAD answer has no body (RFC 9110 9.3.2)
                            self.wfile.write(SLOWDOWN_BODY)
                        return
                    if f.reset_match and f.reset_match in key and proxy._take("reset", key, 1):
                        self._drop()
                        return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                with proxy._lock:
                    proxy.forwarded += 1
                cut = (
                    self.command == "GET"
                    and resp.status in (200, 206)
                    and f.truncate_match
                    and f.truncate_match in key
                    and len(data) > f.truncate_min_bytes
                    and proxy._take("truncate", key, 1)
                )
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if cut:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._drop()
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
