"""A real HTTP receiver on a loopback port for webhook tests: it answers each POST with the next
scripted status (then 200) and keeps every request (headers and raw body) it received."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased: HTTP headers are case-insensitive
    body: bytes
    answered: int


@dataclass
class Receiver:
    url: str
    script: list[int]
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def receiver(script: list[int] | None = None, *, redirect_to: str | None = None) -> Iterator[Receiver]:
    """``with receiver([500, 500]) as r: ...``: two 500s, then 200 for every later POST."""
    state = Receiver("", list(script or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with state.lock:
                status = state.script.pop(0) if state.script else 200
                if redirect_to:
                    status = 307
                state.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                               body, status))
            self.send_response(status)
            if redirect_to:
                self.send_header("Location", redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/musicgen"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
