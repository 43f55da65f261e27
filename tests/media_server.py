"""A real HTTP server on loopback for media-fetching tests: files, redirects, big and slow bodies.

`MediaServer(files)` serves `files[path]` (bytes) at `/path`, plus:
- `/redirect?to=URL` -> 302 to URL; `/loop/N` redirects to `/loop/N+1` forever;
- `/big?n=BYTES&chunked=1` -> BYTES bytes (without Content-Length when chunked);
- `/slow` -> headers, one byte, then nothing until the server stops (a stalled body).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class MediaServer:
    def __init__(self, files: dict[str, bytes] | None = None, content_type: str = "image/png"):
        self.files = dict(files or {})
        self.content_type = content_type
        self.requests: list[str] = []  # paths asked for, in order
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                if parts.path == "/redirect":
                    self._redirect(query["to"][0])
                elif parts.path.startswith("/loop/"):
                    self._redirect(f"/loop/{int(parts.path.rsplit('/', 1)[1]) + 1}")
                elif parts.path == "/big":
                    self._big(int(query["n"][0]), chunked="chunked" in query)
                elif parts.path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    server._stop.wait(60)  # stalls until the server stops
                elif parts.path in server.files:
                    body = server.files[parts.path]
                    self.send_response(200)
                    self.send_header("Content-Type", server.content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _big(self, n: int, chunked: bool) -> None:
                self.send_response(200)
                block = b"\0" * 65536
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    sent = 0
                    try:
                        while sent < n:
                            part = block[: min(len(block), n - sent)]
                            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                            sent += len(part)
                        self.wfile.write(b"0\r\n\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the client stopped reading at its cap
                    return
                self.send_header("Content-Length", str(n))
                self.end_headers()
                try:
                    for start in range(0, n, len(block)):
                        self.wfile.write(block[: min(len(block), n - start)])
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> MediaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)
