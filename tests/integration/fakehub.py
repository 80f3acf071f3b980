"""A Hugging Face Hub stand-in for tests: serves folders as model repos in the Hub's layout
(the API's revision and tree listings, and /resolve/ downloads with the Hub's headers)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _serve(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(f"{self.command} {self.path}")
                for repo, folder in hub.repos.items():
                    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                    if path.startswith(f"/api/models/{repo}/revision/"):
                        info = {"id": repo, "modelId": repo, "sha": SHA, "private": False,
                                "siblings": [{"rfilename": f} for f in files]}
                        return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                    if path.startswith(f"/api/models/{repo}/tree/"):
                        tree = [{"type": "file", "path": f, "size": (folder / f).stat().st_size,
                                 "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest()} for f in files]
                        return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                    prefix = f"/{repo}/resolve/"
                    if path.startswith(prefix):
                        name = path[len(prefix):].split("/", 1)[1]
                        if name not in files:
                            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                        data = (folder / name).read_bytes()
                        etag = hashlib.sha1(data).hexdigest()
                        return self._send(200, data, {"X-Repo-Commit": SHA, "ETag": f'"{etag}"'}, body)
                self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
