"""An HTTP proxy on 127.0.0.1 in front of the moto S3 server, for what a real S3 does and moto does not:
503 SlowDown under load, slow uploads, failing writes. It records every write it passes on, in order."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")


class S3Proxy:
    """failures: the first n reads (GET, HEAD) of each object answer 503 SlowDown.
    write_delay_s: each write (PUT, POST) waits this long before it is passed on, as over a slow link;
    write_mb_per_s: and as long as its body takes at that bandwidth (None: no limit).
    fail_write(key) -> bool: writes of the keys it picks answer 500 InternalError.
    on_write(key): called before each write is passed on (e.g. to kill a worker mid-upload).
    writes: (time, key) of each write that succeeded, in the order they completed."""

    def __init__(self, upstream: str, failures: int = 0, write_delay_s: float = 0.0, fail_write=None, on_write=None,
                 write_mb_per_s: float | None = None):
        self.seen, self.throttled = Counter(), 0
        self.writes: list[tuple[float, str]] = []
        self.failed_writes = 0
        proxy, target = self, urlsplit(upstream).netloc
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def answer(self, status: int, reply: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def forward(self):
                body = self.body()
                key = self.path.split("?")[0]
                write = self.command in ("PUT", "POST")
                if not write and self.command != "DELETE":
                    with lock:
                        proxy.seen[key] += 1
                        throttle = proxy.seen[key] <= failures
                        proxy.throttled += throttle
                    if throttle:
                        return self.answer(503, SLOW_DOWN)
                if write:
                    if on_write is not None:
                        on_write(key)
                    time.sleep(write_delay_s + (len(body) / (write_mb_per_s * 1e6) if write_mb_per_s else 0.0))
                    if fail_write is not None and fail_write(key):
                        with lock:
                            proxy.failed_writes += 1
                        return self.answer(500, INTERNAL)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD reply has no body but announces the object's length.
                self.send_header("Content-Length", response.getheader("Content-Length") or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                if write and response.status < 300:
                    with lock:
                        proxy.writes.append((time.monotonic(), key))

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
