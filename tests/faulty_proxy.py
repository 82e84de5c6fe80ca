"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server, for the object-store fault tests.

Every request is forwarded to the upstream server, except that a seeded share of them fail the way object
stores and their networks do: a ``500 InternalError`` or ``503 SlowDown`` answered without forwarding, a
connection reset before any response (after forwarding, for half of them: the request took effect but its
answer is lost), or a response cut mid-body (the headers promise more bytes than arrive). A further share is
delayed. The draws come from one seeded generator, so the n-th request handled always meets the same fate;
which request is the n-th depends on thread timing, the counts do not.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

#: Hop-by-hop headers a proxy does not pass on.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "transfer-encoding"}
_ERROR_BODY = "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected fault</Message></Error>"


class FaultyProxy:
    """A threaded HTTP proxy on ``127.0.0.1`` that fails ``fault_rate`` of the requests it forwards.

    Parameters
    ----------
    upstream
        ``http://127.0.0.1:PORT`` of the server behind it.
    fault_rate
        Share of requests that fail (500, 503, reset and cut-mid-body in turn).
    delay_rate, max_delay_s
        Share of the other requests delayed, by up to ``max_delay_s`` seconds.
    seed
        Seed of the fault draws.
    """

    KINDS = ("500", "503", "reset", "cut")

    def __init__(self, upstream: str, fault_rate: float = 0.02, delay_rate: float = 0.1,
                 max_delay_s: float = 0.02, seed: int = 0) -> None:  # fmt: skip
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", int(parts.port or 80))
        self.fault_rate = fault_rate
        self.delay_rate = delay_rate
        self.max_delay_s = max_delay_s
        self.enabled = True
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The proxy's endpoint URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyProxy:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def faults(self) -> int:
        """How many faults were injected so far."""
        with self._lock:
            return sum(self.counts[k] for k in self.KINDS)

    def _draw(self) -> tuple[str | None, float, bool]:
        """The fate of the next request: a fault kind (or None), a delay, and whether a reset comes after forwarding."""
        with self._lock:
            self.counts["requests"] += 1
            u, v, w = self._rng.random(), self._rng.random(), self._rng.random()
            if not self.enabled:
                return None, 0.0, False
            if u < self.fault_rate:  # the kinds take turns: every kind comes up, however few the faults
                kind = self.KINDS[sum(self.counts[k] for k in self.KINDS) % len(self.KINDS)]
                self.counts[kind] += 1
                return kind, 0.0, w < 0.5
            delay = v * self.max_delay_s if w < self.delay_rate else 0.0
            if delay:
                self.counts["delayed"] += 1
            return None, delay, False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, as a dropped connection does.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    return response.status, response.getheaders(), data
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                kind, delay, after = proxy._draw()
                if delay:
                    time.sleep(delay)
                if kind in ("500", "503"):
                    code = "InternalError" if kind == "500" else "SlowDown"
                    payload = _ERROR_BODY.format(code=code).encode()
                    self.send_response(int(kind))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if kind == "reset" and not after:
                    self._reset()
                    return
                status, headers, data = self._forward(body)
                if kind == "reset":
                    self._reset()
                    return
                if kind == "cut" and (self.command == "HEAD" or not data):  # nothing to cut: drop the answer
                    self._reset()
                    return
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if kind == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
